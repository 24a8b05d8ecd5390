"""Deprecated path: moved to :mod:`trl_entropy.cli.demo`."""

from ._moved import forward

__getattr__ = forward(__name__, "trl_entropy.cli.demo", "trl_entropy.cli.arguments")
