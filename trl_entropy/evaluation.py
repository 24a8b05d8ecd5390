"""Held-out evaluation for label-free training: batched generation, answer accuracy with a Wilson confidence interval,
and the token entropy of the generated completions.

The entropy of a completion token is that of the model's full next-token distribution at the position where the token
was produced, ``H(softmax(z / T))`` in nats (Agarwal et al., 2025, arXiv 2505.15134, Eq. 1), read from the raw logits
``generate`` returns (before temperature, top-k or any other processor), so it measures the model, not the decoder.

Example::

    from trl_entropy import load_default_model
    from trl_entropy.evaluation import evaluate
    from trl_entropy.tasks import ArithmeticTask

    model, tokenizer = load_default_model()
    problems = ArithmeticTask().dataset(96, split="test")
    result = evaluate(model, tokenizer, problems, do_sample=True, temperature=0.6)
    print(result.summary())  # accuracy ..% [..%, ..%] (n=96), budget 32 tokens, ..% truncated, mean length ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from tqdm.auto import tqdm

from .decoding import GenerationEntropyRecorder

__all__ = [
    "TRUNCATION_WARNING_RATE",
    "Completion",
    "truncation_rate",
    "finishing_budget",
    "EvaluationResult",
    "wilson_interval",
    "generate_completions",
    "evaluate",
    "plot_entropy_histograms",
]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps close to its nominal coverage for small
    ``n`` and proportions near 0 or 1, which is the regime of small held-out sets.

    Args:
        successes: number of successes, in ``[0, n]``.
        n: number of trials, ``>= 1``.
        confidence: two-sided confidence level, in (0, 1).

    Returns:
        ``(low, high)``, with ``0 <= low <= successes / n <= high <= 1``.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
    if not (isinstance(successes, int) and 0 <= successes <= n):
        raise ValueError(f"`successes` must be an integer in [0, n={n}], got {successes!r}.")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp rounding noise: the exact interval always contains p and lies in [0, 1].
    return max(0.0, min(p, centre - half_width)), min(1.0, max(p, centre + half_width))


TRUNCATION_WARNING_RATE = 0.05
"""Largest fraction of truncated completions (no end token within the budget) at which an accuracy is reported as
measured on finished answers; above it, a reported accuracy partly measures whether answers fit the budget."""


@dataclass
class Completion:
    """One generated completion.

    Attributes:
        text: decoded completion, special tokens removed.
        token_ids: generated token ids up to and including the first end-of-sequence token.
        token_entropies: entropy (nats) of the model's next-token distribution at each token of ``token_ids`` (empty
            when generation did not record it).
        token_logprobs: log-probability of each token of ``token_ids`` under that distribution (empty when not
            recorded).
        finished: whether the completion ended with an end-of-sequence token within the token budget; False means
            it was cut off at ``max_new_tokens`` and its final answer may be missing.
    """

    text: str
    token_ids: list[int]
    token_entropies: list[float] = field(default_factory=list)
    finished: bool = True
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def truncated(self) -> bool:
        """Cut off at the token budget before an end-of-sequence token."""
        return not self.finished

    @property
    def mean_entropy(self) -> float:
        """Mean token entropy, NaN for an empty completion (nothing to average)."""
        finite = [h for h in self.token_entropies if math.isfinite(h)]
        return sum(finite) / len(finite) if finite else math.nan

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability of the completion's tokens, NaN for an empty or unrecorded completion."""
        finite = [v for v in self.token_logprobs if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan


def truncation_rate(completions: Sequence[Completion]) -> float:
    """Fraction of ``completions`` cut off at the token budget (NaN for none)."""
    return sum(c.truncated for c in completions) / len(completions) if completions else math.nan


def finishing_budget(completions: Sequence[Completion], fraction: float = 0.95) -> int | None:
    """Smallest token budget at which at least ``fraction`` of ``completions`` would have finished: the
    ``ceil(fraction * n)``-th smallest length among the finished ones. None when fewer than that finished within the
    budget they were generated at (a larger budget is needed to measure it).

    Args:
        completions: completions generated at one (large) budget.
        fraction: required fraction of finished completions, in (0, 1].
    """
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    if not completions:
        raise ValueError("`completions` must hold at least one completion.")
    needed = math.ceil(fraction * len(completions) - 1e-9)
    lengths = sorted(c.num_tokens for c in completions if c.finished)
    return lengths[needed - 1] if len(lengths) >= needed else None


@dataclass
class EvaluationResult:
    """Accuracy and entropy of one decoding setting on a set of problems.

    Attributes:
        num_problems: number of problems (one completion each).
        num_correct: completions whose final answer is correct (:func:`trl_entropy.tasks.grade`).
        do_sample: whether the completions were sampled (else greedy).
        temperature: sampling temperature (1.0 for greedy decoding).
        entropy_temperature: temperature ``T`` of the measured entropy ``H(softmax(z / T))``.
        max_new_tokens: the token budget of each completion.
        completions: the completions, in problem order.
        correct: per-problem correctness.
    """

    num_problems: int
    num_correct: int
    do_sample: bool
    temperature: float
    entropy_temperature: float
    max_new_tokens: int
    completions: list[Completion] = field(repr=False)
    correct: list[bool] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_problems

    def accuracy_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson interval of the accuracy."""
        return wilson_interval(self.num_correct, self.num_problems, confidence)

    @property
    def token_entropies(self) -> list[float]:
        """Entropies of all finite completion tokens, pooled over problems."""
        return [h for c in self.completions for h in c.token_entropies if math.isfinite(h)]

    @property
    def mean_entropy(self) -> float:
        """Mean token entropy over all completion tokens (each token weighs the same); NaN with no token."""
        values = self.token_entropies
        return sum(values) / len(values) if values else math.nan

    @property
    def mean_length(self) -> float:
        """Mean completion length in tokens (truncated completions count ``max_new_tokens``)."""
        return sum(c.num_tokens for c in self.completions) / max(1, len(self.completions))

    @property
    def num_truncated(self) -> int:
        """Completions cut off at ``max_new_tokens`` before an end-of-sequence token."""
        return sum(c.truncated for c in self.completions)

    @property
    def truncation_rate(self) -> float:
        """Fraction of completions cut off at the budget: above :data:`TRUNCATION_WARNING_RATE`, the accuracy
        partly measures whether answers fit in ``max_new_tokens``."""
        return truncation_rate(self.completions)

    def to_dict(self) -> dict[str, Any]:
        """The summary numbers as a JSON-friendly dict (no completions)."""
        low, high = self.accuracy_interval()
        return {
            "num_problems": self.num_problems,
            "num_correct": self.num_correct,
            "accuracy": self.accuracy,
            "accuracy_ci95": [low, high],
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "entropy_temperature": self.entropy_temperature,
            "mean_token_entropy": self.mean_entropy,
            "max_new_tokens": self.max_new_tokens,
            "mean_completion_length": self.mean_length,
            "num_truncated": self.num_truncated,
            "truncation_rate": self.truncation_rate,
        }

    def summary(self) -> str:
        low, high = self.accuracy_interval()
        decoding = f"sampled at T={self.temperature:g}" if self.do_sample else "greedy"
        return (
            f"{decoding}: accuracy {self.accuracy:.1%} [{low:.1%}, {high:.1%}] (n={self.num_problems}), "
            f"budget {self.max_new_tokens} tokens, {self.truncation_rate:.1%} truncated, mean length "
            f"{self.mean_length:.1f} tokens, token entropy {self.mean_entropy:.3f} nats"
        )


def _prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def _end_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _trim_at_end(token_ids: list[int], end_ids: set[int]) -> int:
    """Length of the completion up to and including its first end token."""
    for position, token in enumerate(token_ids):
        if token in end_ids:
            return position + 1
    return len(token_ids)


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    entropy_temperature: float | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    progress: bool = True,
    desc: str = "Generating",
) -> list[Completion]:
    """Generate one completion per prompt in left-padded batches and record each token's entropy and log-probability
    (:class:`~trl_entropy.decoding.GenerationEntropyRecorder`: from the raw logits of each decoding step, in memory
    proportional to batch x steps).

    Sampling draws from the full tempered distribution (``top_k=0``, ``top_p=1``), as TRL's GRPO and RLOO do by
    default, so evaluation sees the same distribution as training.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer; chat prompts (lists of messages) go through its chat template.
        prompts: text prompts or chat conversations.
        max_new_tokens: longest completion, ``>= 1``.
        do_sample: sample at ``temperature`` (else greedy decoding).
        temperature: sampling temperature, ``> 0``; ignored for greedy decoding.
        entropy_temperature: ``T`` of the recorded entropy ``H(softmax(z / T))`` and log-probability
            ``log softmax(z / T)``; defaults to ``temperature`` when sampling and 1.0 for greedy decoding.
        batch_size: prompts per ``generate`` call, ``>= 1``.
        seed: seed of the sampling (``torch.manual_seed``) for reproducible runs; None leaves the RNG alone.
        progress: show a tqdm bar over batches.
        desc: label of the progress bar.

    Returns:
        One :class:`Completion` per prompt, in order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature}.")
    if entropy_temperature is None:
        entropy_temperature = temperature if do_sample else 1.0
    if not (entropy_temperature > 0 and math.isfinite(entropy_temperature)):
        raise ValueError(f"`entropy_temperature` must be a finite number > 0, got {entropy_temperature}.")
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue the last position of each row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end_ids = _end_token_ids(model, tokenizer)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if do_sample
        else {"do_sample": False}
    )
    device = next(model.parameters()).device
    completions: list[Completion] = []
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
            texts = [_prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            recorder = GenerationEntropyRecorder(model, entropy_temperature, ("token_entropy", "token_logprob"))
            with recorder:
                sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
            new_tokens = sequences[:, inputs["input_ids"].size(1) :].tolist()
            trimmed = [ids[: _trim_at_end(ids, end_ids)] for ids in new_tokens]
            values = recorder.per_completion(trimmed)
            for row, ids in enumerate(trimmed):
                completions.append(
                    Completion(
                        text=tokenizer.decode(ids, skip_special_tokens=True),
                        token_ids=ids,
                        token_entropies=values["token_entropy"][row].tolist(),
                        finished=bool(ids) and ids[-1] in end_ids,
                        token_logprobs=values["token_logprob"][row].tolist(),
                    )
                )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def evaluate(
    model,
    tokenizer,
    problems,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    entropy_temperature: float | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    progress: bool = True,
    desc: str | None = None,
) -> EvaluationResult:
    """Accuracy and token entropy of one completion per problem.

    Args:
        problems: a dataset (or list of dicts) with ``prompt`` and ``answer`` columns, e.g.
            :meth:`trl_entropy.tasks.ArithmeticTask.dataset` or :func:`trl_entropy.tasks.load_task`.
        Others: as in :func:`generate_completions`.
    """
    from .tasks import grade

    prompts = list(problems["prompt"]) if hasattr(problems, "column_names") else [p["prompt"] for p in problems]
    answers = list(problems["answer"]) if hasattr(problems, "column_names") else [p["answer"] for p in problems]
    if not prompts:
        raise ValueError("`problems` must hold at least one problem.")
    if desc is None:
        desc = f"Evaluating ({f'sampled, T={temperature:g}' if do_sample else 'greedy'})"
    completions = generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        entropy_temperature=entropy_temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc=desc,
    )
    correct = [grade(c.text, str(a)) for c, a in zip(completions, answers)]
    return EvaluationResult(
        num_problems=len(completions),
        num_correct=sum(correct),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        entropy_temperature=entropy_temperature or (temperature if do_sample else 1.0),
        max_new_tokens=max_new_tokens,
        completions=completions,
        correct=correct,
    )


def plot_entropy_histograms(
    entropies: dict[str, Sequence[float]],
    path: str | Path,
    title: str = "Token entropy of held-out completions",
    bins: int = 40,
    dpi: int = 120,
) -> Path:
    """Overlaid histograms (density, log-scale counts axis) of token-entropy samples, e.g. before/after training.

    Args:
        entropies: label -> entropies in nats (e.g. ``{"before": r0.token_entropies, "after": r1.token_entropies}``).
        path: PNG file to write (parent folders are created).
        title: figure title.
        bins: number of shared bins, ``>= 1``.
        dpi: PNG resolution.

    Returns:
        The written path. Needs matplotlib (``pip install trl-entropy[plots]``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("Plotting needs matplotlib; install it with `pip install trl-entropy[plots]`.") from err
    if bins < 1:
        raise ValueError(f"`bins` must be >= 1, got {bins}.")
    finite = {k: [v for v in values if math.isfinite(v)] for k, values in entropies.items()}
    pooled = [v for values in finite.values() for v in values]
    high = max(pooled, default=1.0) or 1.0
    edges = [high * i / bins for i in range(bins + 1)]
    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    for label, values in finite.items():
        if not values:
            continue
        mean = sum(values) / len(values)
        ax.hist(values, bins=edges, alpha=0.5, label=f"{label} (mean {mean:.3f} nats, {len(values)} tokens)")
    ax.set_yscale("log")  # most tokens sit near 0 nats; the tail is where training changes things
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
