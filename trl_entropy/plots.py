"""Deprecated path: moved to :mod:`trl_entropy.callbacks.plots`."""

from ._moved import forward

__getattr__ = forward(__name__, "trl_entropy.callbacks.plots", "trl_entropy.cli.plot", "trl_entropy.cli.arguments")
