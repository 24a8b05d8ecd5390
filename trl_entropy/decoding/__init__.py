"""Decoding: the package's one decoding loop and its per-step entropy recorder (:mod:`.loop`), the inference-time
logit adjustments EM-INF and adaptive temperature (:mod:`.em_inf`) and their logits processors (:mod:`.processors`)."""

from . import em_inf, loop, processors
from .em_inf import *  # noqa: F403  (each module's __all__)
from .loop import *  # noqa: F403  (each module's __all__)
from .processors import *  # noqa: F403  (each module's __all__)

__all__ = [*em_inf.__all__, *loop.__all__, *processors.__all__]
