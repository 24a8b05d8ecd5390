"""Fills :class:`~trl_entropy.signals.CompletionSignals` once per generation batch, from TRL's own hooks.

The mixin overrides only the hooks where the values already exist: ``_generate_single_turn`` (the decoding steps'
logits), ``_get_per_token_logps_and_entropies`` (TRL's old-log-probs pass), ``_generate`` (the completions and their
tool/environment mask, and the forward fallback for generators that return no logits), ``_calculate_rewards`` (hands
the signals to reward functions that declare them) and ``_generate_and_score_completions`` (plans the batch). Every
override works on a trainer built without ``__init__`` (TRL's tests do that): with nothing planned it only calls
``super()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..ops import self_certainty, token_entropy
from ..signals import MASK_NAME, SIGNAL_NAMES, CompletionSignals, declared_signals, signal_observers

logger = logging.getLogger(__name__)

_OLD_LOGPS_SIGNALS = frozenset({"token_entropy", "token_logprob"})  # what TRL's fused pass returns


class GenerationEntropyRecorder:
    """Records, during ``model.generate``, the requested signals from each decoding step's raw logits.

    A forward hook on the causal LM sees each step's logits ``[B, 1, V]`` (before any logits processor); the entropy
    and self-certainty of ``softmax(logits / T)`` are reduced to ``[B]`` at once, so memory stays ``O(B * steps)``
    plus one ``[B, V]`` row of log-probs for ``token_logprob``: the token sampled at step ``s`` is fed back as the
    input of step ``s + 1``, where its log-prob is read.
    """

    def __init__(self, module: torch.nn.Module, temperature: float, signals: tuple[str, ...]):
        unknown = sorted(set(signals) - set(SIGNAL_NAMES))
        if unknown:
            raise ValueError(f"Unknown signals {unknown}; allowed: {list(SIGNAL_NAMES)}.")
        self.module, self.temperature, self.signals = module, temperature, tuple(signals)
        self.steps: dict[str, list[torch.Tensor]] = {name: [] for name in self.signals}
        self._previous_logprobs: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> GenerationEntropyRecorder:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        logits = getattr(output, "logits", None)
        if logits is None:  # not a generation step (e.g. a fused-head scoring call)
            return
        scaled = logits[:, -1, :].float() / self.temperature
        if "token_entropy" in self.steps:
            self.steps["token_entropy"].append(token_entropy(scaled))
        if "token_self_certainty" in self.steps:
            self.steps["token_self_certainty"].append(self_certainty(scaled))
        if "token_logprob" in self.steps:
            fed = kwargs.get("input_ids", args[0] if args else None)
            if self._previous_logprobs is not None:
                picked = self._previous_logprobs.gather(-1, fed[:, -1:].to(scaled.device)).squeeze(-1)
                self.steps["token_logprob"].append(picked)
            self._previous_logprobs = torch.log_softmax(scaled, dim=-1)

    def per_completion(self, completion_ids: list[list[int]]) -> dict[str, list[torch.Tensor]]:
        """``{signal: [values of completion i]}``, each a float32 CPU tensor of that (EOS-trimmed) completion's
        length."""
        out = {}
        for name, recorded in self.steps.items():
            steps = list(recorded)
            if name == "token_logprob" and self._previous_logprobs is not None:
                # The last sampled token is never fed back: read its log-prob from the completions.
                last = torch.tensor([ids[len(steps)] if len(ids) > len(steps) else 0 for ids in completion_ids])
                device = self._previous_logprobs.device
                steps.append(self._previous_logprobs.gather(-1, last.unsqueeze(-1).to(device)).squeeze(-1))
            stacked = torch.stack(steps, dim=1).float().cpu() if steps else torch.zeros(len(completion_ids), 0)
            out[name] = [stacked[row, : len(ids)].clone() for row, ids in enumerate(completion_ids)]
        return out


@dataclass
class _SignalPlan:
    """What the current generation batch computes, and from where."""

    names: tuple[str, ...]
    source: str
    pending: tuple[list[list[int]], list[torch.Tensor]] | None = None  # waiting for the old-log-probs pass
    generation_values: dict[str, list[torch.Tensor]] | None = None


class CompletionSignalsMixin:
    """Computes the per-token signals that reward functions and callbacks ask for, once per generation batch.

    Who asks: reward functions through their parameters (:func:`~trl_entropy.signals.declared_signals`), callbacks
    through ``on_signals`` / ``requested_signals`` (:func:`~trl_entropy.signals.signal_observers`). Where from
    (:meth:`_entropy_source`): TRL's old-log-probs pass when it makes one and the signals are among what it returns
    (free); else the decoding steps' logits on plain ``generate`` (no extra forward); else one chunked forward.
    """

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

    def _makes_old_logps_pass(self) -> bool:
        """Whether TRL runs the policy over the completions before the rewards (GRPO's rule; RLOO always does)."""
        args = getattr(self, "args", None)
        if args is None:
            return False
        generate_every = args.steps_per_generation * getattr(self, "num_iterations", 1)
        misaligned = args.gradient_accumulation_steps % generate_every != 0
        vllm_correction = getattr(self, "use_vllm", False) and getattr(self, "vllm_importance_sampling_correction", 0)
        return misaligned or bool(vllm_correction)

    def _entropy_source(self) -> str | None:
        """``"old_logps"``, ``"generation"``, ``"forward"``, or None when no reward function and no observer asks."""
        names = self._requested_signals()
        if names is None:
            return None
        if names and set(names) <= _OLD_LOGPS_SIGNALS and self._makes_old_logps_pass():
            return "old_logps"  # TRL's own pass over the completions: exact and free
        plain_generate = not (
            getattr(self, "use_vllm", False)
            or getattr(self, "use_transformers_continuous_batching", False)
            or getattr(self, "rollout_func", None) is not None
            or getattr(self, "tools", None)
        )
        return "generation" if plain_generate else "forward"

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
        """Whether the loss needs TRL's per-token old log-probs kept in the batch (RLOO's token-level loss)."""
        return False

    def _add_to_scored_batch(self, output: dict) -> dict:
        return output

    def _generate_and_score_completions(self, inputs):
        source = self._entropy_source()
        self._signal_plan = _SignalPlan(self._requested_signals(), source) if source is not None else None
        self._signals = None
        self._capture_old_logps_pass = source == "old_logps" or self._needs_old_per_token_logps()
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._capture_old_logps_pass = False
            self._signal_plan = None
            self._signals = None
        return self._add_to_scored_batch(output)

    def _publish_signals(self, signals: CompletionSignals) -> None:
        """Keep the batch's signals for the rewards and hand them to every observer, on every rank."""
        self._signals = signals
        for observer in self._signal_observers():
            observer.on_signals(signals, self)

    def _generate_single_turn(self, *args, **kwargs):
        plan = getattr(self, "_signal_plan", None)
        if plan is None or plan.source != "generation" or not plan.names:
            return super()._generate_single_turn(*args, **kwargs)
        with GenerationEntropyRecorder(self._causal_lm(), self.temperature, plan.names) as recorder:
            result = super()._generate_single_turn(*args, **kwargs)
        completion_ids = result[0] if isinstance(result, tuple) else result
        plan.generation_values = recorder.per_completion(completion_ids)
        return result

    def _causal_lm(self) -> torch.nn.Module:
        unwrapped = self.accelerator.unwrap_model(self.model)
        return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        plan = getattr(self, "_signal_plan", None)
        if plan is None:
            return result
        prompt_ids, completion_ids = result[0], result[1]
        # GRPO returns TRL's `tool_mask` (tool results; a rollout_func's `env_mask`) third; RLOO has no tools.
        tool_mask = result[2] if len(result) > 3 else None
        if tool_mask is None:
            token_mask = [torch.ones(len(ids), dtype=torch.bool) for ids in completion_ids]
        else:
            token_mask = [torch.tensor(list(m), dtype=torch.bool).reshape(-1) for m in tool_mask]
        if plan.source == "old_logps":
            plan.pending = (completion_ids, token_mask)  # the values come with TRL's pass, before the rewards
            return result
        if plan.source == "generation":
            values = plan.generation_values or {}
        else:
            values = self._signals_by_forward(prompt_ids, completion_ids, plan.names)
        self._publish_signals(CompletionSignals(completion_ids, token_mask, **values, source=plan.source))
        return result

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
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
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

    # ---- the old-log-probs pass ----------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        capture = getattr(self, "_capture_old_logps_pass", False) and model is self.model
        if not capture or torch.is_grad_enabled():
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._capture_old_logps_pass = False  # only the first pass of the batch: later ones score the reference
        plan = getattr(self, "_signal_plan", None)
        wanted_entropy = kwargs.get("compute_entropy", False)
        if plan is not None and plan.source == "old_logps" and "token_entropy" in plan.names:
            kwargs["compute_entropy"] = True
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        self._on_old_logps_pass(logps, entropies, attention_mask[:, -logits_to_keep:])
        return logps, entropies if wanted_entropy else None, aux

    def _on_old_logps_pass(self, logps: torch.Tensor, entropies: torch.Tensor | None, completion_mask: torch.Tensor):
        """Fill the batch's signals from TRL's pass. Positions TRL ran with their attention masked out (truncated
        completions under ``mask_truncated_completions``) have no exact value there: they get NaN."""
        plan = getattr(self, "_signal_plan", None)
        if plan is None or plan.source != "old_logps" or plan.pending is None:
            return
        completion_ids, token_mask = plan.pending
        plan.pending = None
        attended = completion_mask.bool().cpu()
        full = {"token_entropy": entropies, "token_logprob": logps}
        values = {}
        for name in plan.names:
            rows = full[name].detach().float().cpu()
            rows = torch.where(attended, rows, torch.full_like(rows, float("nan")))
            values[name] = [rows[row, : len(ids)].clone() for row, ids in enumerate(completion_ids)]
        self._publish_signals(CompletionSignals(completion_ids, token_mask, **values, source="old_logps"))

    # ---- the rewards ---------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        signals = getattr(self, "_signals", None)
        asked = self._reward_signal_names() if signals is not None else set()
        if asked:
            missing = sorted(asked - set(signals.available()))
            if missing:
                raise RuntimeError(f"The signals {missing} were asked for but not computed ({signals.source}).")
            # TRL hands every non-prompt column of `inputs` to the reward functions as a per-completion list.
            names = [name for name in (*SIGNAL_NAMES, MASK_NAME) if name in asked]
            inputs = [{**row, **{name: getattr(signals, name)[i] for name in names}} for i, row in enumerate(inputs)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
