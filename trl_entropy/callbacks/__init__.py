"""Training callbacks: entropy statistics (:mod:`.entropy_stats`), the collapse triggers (:mod:`.collapse`), the
collapse guard (:mod:`.collapse_guard`) and the plots of a run's statistics file (:mod:`.plots`)."""

from . import collapse, collapse_guard, entropy_stats
from .collapse import *  # noqa: F403  (each module's __all__)
from .collapse_guard import *  # noqa: F403  (each module's __all__)
from .entropy_stats import *  # noqa: F403  (each module's __all__)

__all__ = [*collapse.__all__, *collapse_guard.__all__, *entropy_stats.__all__]
