"""Fills :class:`~trl_entropy.signals.CompletionSignals` once per generation batch, from what TRL already computes.

Where the values come from (:attr:`CompletionSignals.source <trl_entropy.signals.CompletionSignals>`):

- ``"generation"``: plain transformers ``generate`` (no vLLM, continuous batching, ``rollout_func`` or tools). A
  forward hook reads each decoding step's logits, so every completion, finished or cut off at the budget, is scored
  exactly and no forward pass is added. This is the source whenever generation runs through transformers, whatever
  passes TRL makes afterwards.
- ``"old_logps"``: the other generators, when TRL runs its own no-grad pass of the policy over the completions before
  the rewards (RLOO always; GRPO with vLLM importance sampling or reused generation batches). The pass is *observed*,
  not predicted from TRL's configuration: the first call of ``_get_per_token_logps_and_entropies`` between generation
  and the rewards that runs the policy (``self.model``, without gradient, with a PEFT policy's adapters active: TRL
  scores a PEFT reference with the same module, adapters off). Completions TRL masked out of that pass
  (``mask_truncated_completions``) have no value there; they are scored by TRL's pass function again, with their
  completion tokens attended, so a signal never depends on that option.
- ``"forward"``: otherwise, one policy pass through TRL's pass function (chunked, its fused LM head).

The hooks overridden, each calling ``super()``: ``_generate_and_score_completions`` (plans the batch),
``_generate_single_turn`` (records the decoding steps), ``_generate`` (the completions and their tool/environment
mask), ``_get_per_token_logps_and_entropies`` (observes TRL's pass) and ``_calculate_rewards`` (completes the signals
and hands them to the reward functions that declare them). Every override works on a trainer built without
``__init__`` (TRL's tests do that): with nothing planned it only calls ``super()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..decoding.loop import GenerationEntropyRecorder
from ..ops import self_certainty, token_entropy
from ..signals import MASK_NAME, SIGNAL_NAMES, CompletionSignals, SignalSource, declared_signals, signal_observers
from ._trl import generate_fields, is_multimodal, plain_generate, scores_the_policy

logger = logging.getLogger(__name__)

_TRL_PASS_SIGNALS = frozenset({"token_entropy", "token_logprob"})  # what TRL's fused pass returns


@dataclass
class _PolicyPass:
    """TRL's own no-grad pass of the policy over the batch's completions, as TRL called it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_to_keep: int
    args: tuple
    kwargs: dict
    logps: torch.Tensor
    entropies: torch.Tensor | None


@dataclass
class _BatchPlan:
    """Everything the hooks of one generation batch share, from ``_generate_and_score_completions`` to the rewards:
    the only state this mixin keeps across TRL's hooks, and only while the batch is being built.

    ``source`` is where the signals come from: ``"generation"`` (the decoding logits), ``"scoring"`` (after
    generation, from TRL's pass of the policy when it makes one, else from one forward of ours), or None when nothing
    asks for them. ``watch_policy_pass``: TRL's first no-grad pass of the policy in this batch is still to come and is
    to be read (for the signals, or for a loss that needs its log-probs)."""

    names: tuple[str, ...]
    source: str | None
    watch_policy_pass: bool = False
    generation_values: dict[str, list[torch.Tensor]] | None = None
    completions: tuple[list[list[int]], list[list[int]], list[torch.Tensor]] | None = None  # prompts, ids, mask
    policy_pass: _PolicyPass | None = None
    signals: CompletionSignals | None = None  # once published


class CompletionSignalsMixin(SignalSource):
    """Computes the per-token signals that reward functions and callbacks ask for, once per generation batch.

    Who asks: reward functions through their parameters (:func:`~trl_entropy.signals.declared_signals`), callbacks
    through ``on_signals`` / ``requested_signals`` (:func:`~trl_entropy.signals.signal_observers`). Where from: see the
    module docstring; :meth:`_entropy_source` gives the plan, ``CompletionSignals.source`` what a batch used.
    """

    _generate_fields: tuple[str, ...] = ()  # the layout of TRL's `_generate` result, set by each trainer
    _batch: _BatchPlan | None = None  # set while a generation batch is built

    # ---- who asks for what ---------------------------------------------------------------------------------------
    def _signal_observers(self) -> list:
        handler = getattr(self, "callback_handler", None)
        return signal_observers(getattr(handler, "callbacks", []))

    def _reward_signal_names(self) -> set[str]:
        names: set[str] = set()
        for func in getattr(self, "reward_funcs", None) or []:
            names.update(declared_signals(func))
        return names

    def _requested_signals(self) -> tuple[str, ...] | None:
        """The signals to compute for the next batch, or None when nobody asks for anything (not even the mask)."""
        wanted = self._reward_signal_names()
        observers = self._signal_observers()
        for observer in observers:
            wanted.update(observer.requested_signals)
        if not wanted and not observers:
            return None
        return tuple(name for name in SIGNAL_NAMES if name in wanted)

    def _plain_generate(self) -> bool:
        """Whether completions come from transformers ``generate`` on this process (:func:`._trl.plain_generate`)."""
        return plain_generate(self)

    def _entropy_source(self) -> str | None:
        """The plan: ``"generation"`` (decoding logits), ``"scoring"`` (TRL's pass of the policy over the completions
        when it makes one, else one forward of ours), or None when no reward function and no observer asks."""
        if self._requested_signals() is None:
            return None
        return "generation" if self._plain_generate() else "scoring"

    def _check_signal_columns(self, *datasets) -> None:
        """A dataset column named like a signal would be shadowed in the reward kwargs: refuse it at init."""
        asked = self._reward_signal_names()
        for dataset in datasets:
            columns = getattr(dataset, "column_names", None) or []
            if isinstance(columns, dict):  # a DatasetDict
                columns = [c for names in columns.values() for c in names]
            clash = sorted(asked & set(columns))
            if clash:
                raise ValueError(
                    f"Dataset column(s) {clash} have the name of a per-token signal that a reward function declares; "
                    "rename the column(s)."
                )

    # ---- the batch -----------------------------------------------------------------------------------------------
    def _needs_old_per_token_logps(self) -> bool:
        """Whether the loss needs the per-token log-probs of TRL's policy pass kept (RLOO's forking-token loss)."""
        return False

    def _on_policy_pass(self, logps: torch.Tensor) -> None:
        """Called with the log-probs of TRL's first policy pass of a batch (see :meth:`_needs_old_per_token_logps`)."""

    def _add_to_scored_batch(self, output: dict) -> dict:
        return output

    def _generate_and_score_completions(self, inputs):
        source = self._entropy_source()
        self._batch = _BatchPlan(
            names=tuple(self._requested_signals() or ()) if source is not None else (),
            source=source,
            watch_policy_pass=source == "scoring" or self._needs_old_per_token_logps(),
        )
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._batch = None
        return self._add_to_scored_batch(output)

    def _publish_signals(self, signals: CompletionSignals) -> None:
        """Keep the batch's signals for the rewards and hand them to every observer, on every rank."""
        if self._batch is not None:
            self._batch.signals = signals
        for observer in self._signal_observers():
            observer.on_signals(signals, self)

    def _generate_single_turn(self, *args, **kwargs):
        plan = self._batch
        if plan is None or plan.source != "generation" or not plan.names:
            return super()._generate_single_turn(*args, **kwargs)
        with GenerationEntropyRecorder(self._causal_lm(), self.temperature, plan.names) as recorder:
            result = super()._generate_single_turn(*args, **kwargs)
        completion_ids = result[0] if isinstance(result, tuple) else result
        plan.generation_values = recorder.per_completion(completion_ids)
        return result

    def _generate_owner(self) -> str:
        """The class whose ``_generate`` this mixin's ``super()`` runs (TRL's, or a subclass of it)."""
        mro = type(self).__mro__
        after = mro[mro.index(CompletionSignalsMixin) + 1 :]
        return next((c.__name__ for c in after if "_generate" in vars(c)), "the trainer")

    def _causal_lm(self) -> torch.nn.Module:
        unwrapped = self.accelerator.unwrap_model(self.model)
        return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        plan = self._batch
        if plan is None or plan.source is None:
            return result
        fields = generate_fields(result, self._generate_fields, self._generate_owner())
        # TRL's `tool_mask`: 0 on tool results and on a rollout_func's environment tokens (RLOO has no tools).
        tool_mask = fields.get("tool_mask")
        if tool_mask is None:
            token_mask = [torch.ones(len(ids), dtype=torch.bool) for ids in fields["completion_ids"]]
        else:
            token_mask = [torch.tensor(list(m), dtype=torch.bool).reshape(-1) for m in tool_mask]
        if plan.source == "generation":
            values = plan.generation_values or {}
            self._publish_signals(
                CompletionSignals(fields["completion_ids"], token_mask, **values, source="generation")
            )
        else:  # completed in `_calculate_rewards`, after the passes TRL makes
            plan.completions = (fields["prompt_ids"], fields["completion_ids"], token_mask)
        return result

    # ---- TRL's pass of the policy --------------------------------------------------------------------------------
    def _scores_the_policy(self, model) -> bool:
        """Whether a pass with ``model`` runs the policy (:func:`._trl.scores_the_policy`)."""
        return scores_the_policy(self, model)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        plan = self._batch
        if plan is None or not plan.watch_policy_pass or torch.is_grad_enabled() or not self._scores_the_policy(model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        plan.watch_policy_pass = False  # the first pass of the policy in the batch
        reads = plan.source == "scoring" and plan.completions is not None
        wanted_entropy = kwargs.get("compute_entropy", False)
        if reads and "token_entropy" in plan.names:
            kwargs["compute_entropy"] = True
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if reads:
            plan.policy_pass = _PolicyPass(input_ids, attention_mask, logits_to_keep, args, kwargs, logps, entropies)
        self._on_policy_pass(logps)
        return logps, entropies if wanted_entropy else None, aux

    # ---- completing the signals after the passes -----------------------------------------------------------------
    def _complete_signals(self, inputs: list[dict]) -> None:
        """Publish the batch's signals when they come after generation (``"scoring"``): from TRL's policy pass when it
        made one, else from one forward. Called before the rewards."""
        plan = self._batch
        if plan is None or plan.source is None or plan.signals is not None or plan.completions is None:
            return
        prompt_ids, completion_ids, token_mask = plan.completions
        names = plan.names
        observed = plan.policy_pass
        if names and observed is not None and set(names) <= _TRL_PASS_SIGNALS:
            values, source = self._signals_from_pass(observed, completion_ids, names), "old_logps"
        else:
            if names and is_multimodal(inputs):
                raise RuntimeError(
                    f"The per-token signals {list(names)} of multimodal completions from a generator that returns no "
                    "logits (vLLM, tools, a rollout_func) need the image inputs, which TRL builds after generation "
                    "and hands only to its own passes, and it made none before the rewards. Keep vLLM's importance "
                    "sampling correction on (TRL's pass then provides token_entropy and token_logprob), or generate "
                    "with transformers."
                )
            values, source = self._signals_by_forward(prompt_ids, completion_ids, names), "forward"
        self._publish_signals(CompletionSignals(completion_ids, token_mask, **values, source=source))

    @torch.no_grad()
    def _signals_from_pass(
        self, observed: _PolicyPass, completion_ids: list[list[int]], names: tuple[str, ...]
    ) -> dict[str, list[torch.Tensor]]:
        """The values of TRL's pass. Completions it did not attend to in full (masked out by
        ``mask_truncated_completions``) are scored again by TRL's pass function, on the same inputs with their
        completion tokens attended, so that they get their exact values too."""
        width = observed.logits_to_keep
        attended = observed.attention_mask[:, -width:].bool()
        full = torch.zeros_like(attended)
        for row, ids in enumerate(completion_ids):
            full[row, : len(ids)] = True
        per_name = {"token_entropy": observed.entropies, "token_logprob": observed.logps}
        incomplete = [row for row, ids in enumerate(completion_ids) if not bool(attended[row, : len(ids)].all())]
        if incomplete:
            attention = observed.attention_mask.clone()
            attention[:, -width:] = full.to(attention.dtype)
            kwargs = {**observed.kwargs, "compute_entropy": "token_entropy" in names}
            logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model, observed.input_ids, attention, width, *observed.args, **kwargs
            )
            rescored = {"token_entropy": entropies, "token_logprob": logps}
            keep = torch.tensor([row not in incomplete for row in range(len(completion_ids))], device=attended.device)
            per_name = {name: torch.where(keep.unsqueeze(1), per_name[name], rescored[name]) for name in names}
        return {
            name: [
                per_name[name][row, : len(ids)].detach().float().cpu().clone()
                for row, ids in enumerate(completion_ids)
            ]
            for name in names
        }

    @torch.no_grad()
    def _signals_by_forward(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], names: tuple[str, ...]
    ) -> dict[str, list[torch.Tensor]]:
        """One batched, chunked policy forward over prompt + completion, for generators that return no logits."""
        if not names:
            return {}
        device = self.accelerator.device
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
        width = max([len(c) for c in completion_ids] + [1])
        rows, masks = [], []
        prompt_width = max(len(p) for p in prompt_ids)
        for p, c in zip(prompt_ids, completion_ids):
            # Left-pad prompts, right-pad completions: the completion block is then the last `width` positions.
            rows.append([pad_id] * (prompt_width - len(p)) + list(p) + list(c) + [pad_id] * (width - len(c)))
            masks.append([0] * (prompt_width - len(p)) + [1] * (len(p) + len(c)) + [0] * (width - len(c)))
        input_ids = torch.tensor(rows, device=device)
        attention_mask = torch.tensor(masks, device=device)
        batch_size = self.args.per_device_train_batch_size
        padded: dict[str, torch.Tensor] = {}
        if "token_self_certainty" in names:
            # The fused head returns no full distribution: take the completion block's logits, chunk by chunk.
            chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
            for start in range(0, input_ids.size(0), batch_size):
                logits = self.model(
                    input_ids=input_ids[start : start + batch_size],
                    attention_mask=attention_mask[start : start + batch_size],
                    logits_to_keep=width + 1,
                ).logits[:, :-1]
                scaled = logits.float() / self.temperature
                if "token_self_certainty" in names:
                    chunks["token_self_certainty"].append(self_certainty(scaled))
                if "token_entropy" in names:
                    chunks["token_entropy"].append(token_entropy(scaled))
                if "token_logprob" in names:
                    targets = input_ids[start : start + batch_size, -width:].unsqueeze(-1)
                    chunks["token_logprob"].append(torch.log_softmax(scaled, -1).gather(-1, targets).squeeze(-1))
            padded = {name: torch.cat(parts) for name, parts in chunks.items()}
        else:
            logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                width,
                batch_size=batch_size,
                compute_entropy="token_entropy" in names,
            )
            padded = {"token_logprob": logps, "token_entropy": entropies}
        return {
            name: [padded[name][row, : len(ids)].float().cpu() for row, ids in enumerate(completion_ids)]
            for name in names
        }

    # ---- the rewards ---------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._complete_signals(inputs)
        signals = self._batch.signals if self._batch is not None else None
        asked = self._reward_signal_names() if signals is not None else set()
        if asked:
            missing = sorted(asked - set(signals.available()))
            if missing:
                raise RuntimeError(f"The signals {missing} were asked for but not computed ({signals.source}).")
            # TRL hands every non-prompt column of `inputs` to the reward functions as a per-completion list.
            names = [name for name in (*SIGNAL_NAMES, MASK_NAME) if name in asked]
            inputs = [{**row, **{name: getattr(signals, name)[i] for name in names}} for i, row in enumerate(inputs)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
