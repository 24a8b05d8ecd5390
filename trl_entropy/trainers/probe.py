"""A short label-free training probe: do a few steps of EM-RL token move held-out accuracy, and which way?

In the spirit of Model Collapse Step (arXiv 2603.08660), which ranks models' label-free trainability from a short
training run rather than from static quantities: :func:`training_probe` trains ``model`` in place for a
few steps of EM-RL token (:class:`~trl_entropy.trainers.EntropyGRPOTrainer`, ``entropy_reward="token"``; prompts only,
no answer reaches the trainer) and measures greedy and sampled accuracy on held-out problems before and after. The
*trend*, the mean of the two changes, is the probe's reading. ``benchmarks/bench_diagnose.py`` scores it as a rule,
out of sample, beside ``diagnose``'s static quantities (docs/diagnose.md).

The defaults are the study's protocol (``benchmarks/bench_label_free.py``): 2 prompts x 4 completions per step, lr
2e-5, no KL, 32 tokens, T = 1; 8 steps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["training_probe"]


def _check(name: str, value: Any, low: float, high: float | None = None, kind: type = int) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be {'an integer' if kind is int else 'a number'} {bound}, got {value!r}.")


def training_probe(
    model,
    tokenizer,
    train_prompts: Sequence[str | list[dict]],
    held_out: Sequence[dict],
    *,
    steps: int = 8,
    prompts_per_step: int = 2,
    num_generations: int = 4,
    learning_rate: float = 2e-5,
    max_completion_length: int = 32,
    eval_max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    bf16: bool | None = None,
    batch_size: int = 32,
    callbacks: Sequence | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` steps of EM-RL token on ``train_prompts`` and return held-out accuracy
    before and after.

    Args:
        train_prompts: at least ``steps * prompts_per_step`` prompts (strings or chat messages), used in order.
        held_out: problems with ``prompt`` and ``answer`` (never trained on), evaluated greedy and sampled at
            ``temperature`` (sampling seed ``1000 + seed``), at most ``eval_max_new_tokens`` tokens.
        bf16: bf16 autocast for training; None: where the CPU or GPU has it natively
            (:func:`trl_entropy.hardware.default_bf16`).
        callbacks: extra ``transformers.TrainerCallback`` s for the probe's trainer (e.g. progress).

    Returns:
        ``before`` and ``after`` (per mode ``greedy`` / ``sampled``: ``accuracy`` and ``truncation_rate``),
        ``changes`` (after minus before, per mode), ``trend`` (their mean), ``seconds`` and the ``settings``.
    """
    _check("steps", steps, 1)
    _check("prompts_per_step", prompts_per_step, 1)
    _check("num_generations", num_generations, 2)
    _check("max_completion_length", max_completion_length, 1)
    _check("eval_max_new_tokens", eval_max_new_tokens, 1)
    _check("learning_rate", learning_rate, 0.0, kind=float)
    _check("temperature", temperature, 1e-6, kind=float)
    needed = steps * prompts_per_step
    if len(train_prompts) < needed:
        raise ValueError(
            f"`train_prompts` must hold at least steps x prompts_per_step = {needed} prompts, "
            f"got {len(train_prompts)}."
        )
    if not held_out or any("prompt" not in row or "answer" not in row for row in held_out):
        raise ValueError("`held_out` must be a non-empty list of problems with `prompt` and `answer`.")

    import torch
    from datasets import Dataset

    from ..evaluation.accuracy import evaluate
    from ..hardware import default_bf16
    from .grpo import EntropyGRPOConfig, EntropyGRPOTrainer

    settings = {
        "steps": steps,
        "prompts_per_step": prompts_per_step,
        "num_generations": num_generations,
        "learning_rate": learning_rate,
        "max_completion_length": max_completion_length,
        "eval_max_new_tokens": eval_max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "bf16": default_bf16() if bf16 is None else bf16,
    }
    began = time.perf_counter()

    def accuracies(current) -> dict[str, dict[str, float]]:
        current.eval()
        out = {}
        for mode, do_sample in (("greedy", False), ("sampled", True)):
            result = evaluate(
                current,
                tokenizer,
                list(held_out),
                max_new_tokens=eval_max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                seed=1000 + seed if do_sample else None,
                batch_size=batch_size,
                progress=False,
            )
            out[mode] = {"accuracy": result.accuracy, "truncation_rate": result.truncation_rate}
        return out

    before = accuracies(model)
    with tempfile.TemporaryDirectory() as output_dir:
        config = EntropyGRPOConfig(
            output_dir=output_dir,
            entropy_reward="token",
            entropy_stats=False,
            learning_rate=learning_rate,
            beta=0.0,
            temperature=temperature,
            max_completion_length=max_completion_length,
            max_steps=steps,
            num_generations=num_generations,
            per_device_train_batch_size=prompts_per_step * num_generations,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=settings["bf16"],
            activation_checkpointing=False,  # a few short steps: recomputing activations would only cost time
            disable_tqdm=True,
        )
        trainer = EntropyGRPOTrainer(
            model=model,
            processing_class=tokenizer,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in train_prompts[:needed]]),
            callbacks=list(callbacks or []),
        )
        trainer.train()
    after = accuracies(trainer.model)
    changes = {mode: after[mode]["accuracy"] - before[mode]["accuracy"] for mode in before}
    return {
        "before": before,
        "after": after,
        "changes": changes,
        "trend": statistics.fmean(changes.values()),
        "seconds": time.perf_counter() - began,
        "settings": settings,
    }
