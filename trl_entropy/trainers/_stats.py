"""The ``entropy_stats`` field of the entropy configs, and the trainer side that attaches
:class:`~trl_entropy.callbacks.EntropyStatsCallback` from it.

One switch for the Python API and the command line: ``EntropyGRPOTrainer``, ``EntropyRLOOTrainer`` and ``EMFTTrainer``
attach the callback in their constructor when their config asks for it, and ``trl-entropy grpo|rloo|emft`` parses the
same field (``--entropy_stats``), so the same config logs the same metrics from both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EntropyStatsArguments", "EntropyStatsMixin"]


@dataclass
class EntropyStatsArguments:
    """The config field that attaches :class:`~trl_entropy.callbacks.EntropyStatsCallback`.

    Parameters:
        entropy_stats (`bool` or `None`, *optional*, defaults to `None`):
            Attach :class:`~trl_entropy.callbacks.EntropyStatsCallback` in the trainer's constructor: the
            ``sampling_entropy/*`` scalars (mean, std and quantiles of the token entropy of each generation batch,
            forking-token threshold, repetition rate...), the entropy histogram for TensorBoard / W&B / Trackio,
            ``output_dir/entropy_stats.jsonl`` and PNG plots at the end of training (docs/metrics.md lists every
            name). One of:

            - `None` (auto): on when an entropy method is on, that is `entropy_reward` other than `"none"` or
              `forking_token_ratio` < 1 (GRPO, RLOO), and always for EM-FT; off otherwise, so a config with every
              entropy option off runs TRL's trainer unchanged;
            - `True`: also with every entropy option off, e.g. to watch the entropy of a plain GRPO baseline. The
              trainer then computes each generation batch's token entropies for the callback: free from the decoding
              logits with transformers ``generate``; with vLLM, tools or a ``rollout_func``, read from TRL's own
              old-log-probs pass when it makes one, else one no-grad forward of the policy per generation batch;
            - `False`: never.

            An ``EntropyStatsCallback`` of your own (``callbacks=[...]`` or ``trainer.add_callback``) replaces the
            default one, so settings such as ``quantiles`` or ``bins`` stay yours; ``trainer.remove_callback(
            EntropyStatsCallback)`` drops it. The command line's ``--entropy_stats`` is this field.
    """

    entropy_stats: bool | None = field(
        default=None,
        metadata={
            "help": "Attach EntropyStatsCallback (sampling_entropy/* scalars, histogram, entropy_stats.jsonl, PNG "
            "plots). Unset: on when an entropy method is on (entropy_reward, forking_token_ratio < 1, EM-FT); true: "
            "always; false: never."
        },
    )

    def __post_init__(self):
        if self.entropy_stats is not None and not isinstance(self.entropy_stats, bool):
            raise TypeError(
                f"`entropy_stats` must be True, False or None (auto), got {self.entropy_stats!r} "
                f"({type(self.entropy_stats).__name__})."
            )
        parent = getattr(super(), "__post_init__", None)  # TRL's config, after this one in the MRO
        if parent is not None:
            parent()


def _is_stats_callback(callback: Any) -> bool:
    """Whether ``callback`` (an instance or a class, as ``Trainer.add_callback`` takes) is an EntropyStatsCallback."""
    from ..callbacks.entropy_stats import EntropyStatsCallback

    if isinstance(callback, type):
        return issubclass(callback, EntropyStatsCallback)
    return isinstance(callback, EntropyStatsCallback)


class EntropyStatsMixin:
    """Attaches :class:`~trl_entropy.callbacks.EntropyStatsCallback` in ``__init__`` as ``args.entropy_stats`` says
    (see :class:`EntropyStatsArguments`), through Trainer's public ``add_callback``, unless a callback of that class
    was passed already."""

    _default_entropy_stats: Any = None  # the callback this mixin attached, while it is in the callback list

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wants_entropy_stats() and not any(_is_stats_callback(cb) for cb in self.callback_handler.callbacks):
            from ..callbacks.entropy_stats import EntropyStatsCallback

            callback = EntropyStatsCallback(self)
            self.add_callback(callback)
            self._default_entropy_stats = callback

    def _entropy_methods_on(self) -> bool:
        """Whether the trainer runs an entropy method (what ``entropy_stats=None`` switches the callback on for): the
        entropy reward or the forking-token mask of GRPO / RLOO; EM-FT overrides it."""
        from ._entropy import config_entropy_options

        settings = config_entropy_options(self.args)
        return settings.entropy_reward != "none" or settings.forking_tokens_enabled

    def _wants_entropy_stats(self) -> bool:
        choice = getattr(self.args, "entropy_stats", None)  # a plain TRL config has no such field: auto
        return self._entropy_methods_on() if choice is None else choice

    def add_callback(self, callback) -> None:
        """Trainer's ``add_callback``; an ``EntropyStatsCallback`` added by the user replaces the default one (two
        would log every scalar twice and write the JSONL twice)."""
        default = self._default_entropy_stats
        if default is not None and _is_stats_callback(callback):
            self.remove_callback(default)
            self._default_entropy_stats = None
        super().add_callback(callback)
