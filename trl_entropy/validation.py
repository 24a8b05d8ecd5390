"""Deprecated path: moved to :mod:`trl_entropy.evaluation.validation`."""

from ._moved import forward

__getattr__ = forward(__name__, "trl_entropy.evaluation.validation")
