"""Old module paths kept working after the package was laid out in wings (callbacks, decoding, evaluation, cli).

Each old module (``trl_entropy.generate``, ``trl_entropy.inference``, ...) is one line that calls :func:`forward`: it
warns once, naming the new path, and answers every attribute from the new module, private names included, so existing
imports keep working unchanged until they are updated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib import import_module
from typing import Any


def forward(old: str, *new: str) -> Callable[[str], Any]:
    """The module ``__getattr__`` of the deprecated path ``old``: every name is read from the first module of ``new``
    that has it."""
    warnings.warn(f"{old} is deprecated: import from {' or '.join(new)}", DeprecationWarning, stacklevel=3)

    def __getattr__(name: str) -> Any:
        for module in new[:-1]:
            if hasattr(import_module(module), name):
                return getattr(import_module(module), name)
        return getattr(import_module(new[-1]), name)

    return __getattr__
