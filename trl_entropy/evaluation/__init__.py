"""Evaluation: held-out accuracy and entropy (:mod:`.accuracy`), generation with scoring and answer parsing
(:mod:`.generate`), the built-in tasks (:mod:`.tasks`), the pre-training diagnosis (:mod:`.diagnose`) and its
leave-one-out validation (:mod:`.validation`). The package's names are those of :mod:`.accuracy`."""

from . import accuracy
from .accuracy import *  # noqa: F403  (each module's __all__)

__all__ = [*accuracy.__all__]
