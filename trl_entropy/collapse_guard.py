"""Deprecated path: moved to :mod:`trl_entropy.callbacks.collapse_guard`."""

from ._moved import forward

__getattr__ = forward(__name__, "trl_entropy.callbacks.collapse_guard", "trl_entropy.cli.arguments")
