"""Held-out evaluation for label-free training: answer accuracy with a Wilson confidence interval and the token entropy
of the generated completions, at one token budget (:func:`evaluate`) or at the first budget of a ladder where the
answers finish (:func:`evaluate_ladder`, which decodes each token once). Generation is
:class:`trl_entropy.decoding.Decoder`'s, the package's one decoding loop.

The entropy of a completion token is that of the model's full next-token distribution at the position where the token
was produced, ``H(softmax(z / T))`` in nats (Agarwal et al., 2025, arXiv 2505.15134, Eq. 1), read from the raw logits
``generate`` returns (before temperature, top-k or any other processor), so it measures the model, not the decoder.

Example::

    from trl_entropy import load_default_model
    from trl_entropy.evaluation import evaluate
    from trl_entropy.evaluation.tasks import ArithmeticTask

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
from typing import Any

from ..decoding.loop import Completion, Decoder, truncation_rate
from ..stats import wilson_interval

__all__ = [
    "TRUNCATION_WARNING_RATE",
    "Completion",
    "truncation_rate",
    "EvaluationResult",
    "wilson_interval",
    "generate_completions",
    "continue_completions",
    "evaluate",
    "evaluate_ladder",
    "plot_entropy_histograms",
]


TRUNCATION_WARNING_RATE = 0.05
"""Largest fraction of truncated completions (no end token within the budget) at which an accuracy is reported as
measured on finished answers; above it, a reported accuracy partly measures whether answers fit the budget."""


@dataclass
class EvaluationResult:
    """Accuracy and entropy of one decoding setting on a set of problems.

    Attributes:
        num_problems: number of problems (one completion each).
        num_correct: completions whose final answer is correct (:func:`trl_entropy.evaluation.tasks.grade`).
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


def _sampling(do_sample: bool, temperature: float, entropy_temperature: float | None) -> tuple[dict, float]:
    """``Decoder`` sampling settings and the entropy temperature: the full tempered distribution (``top_k=0``,
    ``top_p=1``), as TRL's GRPO and RLOO sample by default, so evaluation sees the distribution training sees."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature}.")
    if entropy_temperature is None:
        entropy_temperature = temperature if do_sample else 1.0
    if not (entropy_temperature > 0 and math.isfinite(entropy_temperature)):
        raise ValueError(f"`entropy_temperature` must be a finite number > 0, got {entropy_temperature}.")
    settings = {"do_sample": do_sample, "record": True, "entropy_temperature": entropy_temperature}
    if do_sample:
        settings.update(temperature=temperature, top_k=0, top_p=1.0)
    return settings, entropy_temperature


def _check_budget(max_new_tokens: int, batch_size: int) -> None:
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")


def _evaluation_decoder(
    model, tokenizer, prompts, prefixes, settings: dict, batch_size, seed, progress, desc, segment_tokens
) -> Decoder:
    """The one :class:`~trl_entropy.decoding.Decoder` of this module's entry points, with :func:`_sampling`'s
    settings."""
    return Decoder(
        model,
        tokenizer,
        prompts,
        prefixes,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc=desc,
        segment_tokens=segment_tokens,
        **settings,
    )


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
    *,
    segment_tokens: int | None = 32,
) -> list[Completion]:
    """Generate one completion per prompt in left-padded batches and record each token's entropy and log-probability
    (:class:`~trl_entropy.decoding.GenerationEntropyRecorder`: from the raw logits of each decoding step, in memory
    proportional to batch x steps).

    Sampling draws from the full tempered distribution (``top_k=0``, ``top_p=1``), as TRL's GRPO and RLOO do by
    default, so evaluation sees the same distribution as training.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer; chat prompts (lists of messages) go through its chat template, strings are fed as
            they are.
        prompts: text prompts or chat conversations.
        max_new_tokens: longest completion, ``>= 1``.
        do_sample: sample at ``temperature`` (else greedy decoding).
        temperature: sampling temperature, ``> 0``; ignored for greedy decoding.
        entropy_temperature: ``T`` of the recorded entropy ``H(softmax(z / T))`` and log-probability
            ``log softmax(z / T)``; defaults to ``temperature`` when sampling and 1.0 for greedy decoding.
        batch_size: rows per ``generate`` call, ``>= 1``.
        seed: seed of the sampling (``torch.manual_seed``) for reproducible runs; None leaves the RNG alone.
        progress: show a tqdm bar in tokens, with a rate and an ETA.
        desc: label of the progress bar.
        segment_tokens: see :class:`~trl_entropy.decoding.Decoder` (None: one ``generate`` call per batch, as
            before the decoder dropped ended rows).

    Returns:
        One :class:`Completion` per prompt, in order.
    """
    _check_budget(max_new_tokens, batch_size)
    settings, _ = _sampling(do_sample, temperature, entropy_temperature)
    decoder = _evaluation_decoder(
        model, tokenizer, prompts, None, settings, batch_size, seed, progress, desc, segment_tokens
    )
    return decoder.extend_to(max_new_tokens)


def continue_completions(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    completions: Sequence[Completion],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    entropy_temperature: float | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    progress: bool = True,
    desc: str = "Continuing",
    *,
    segment_tokens: int | None = 32,
) -> list[Completion]:
    """The completions of ``prompts`` at the larger budget ``max_new_tokens``: the finished ones as they are, the ones
    cut off continued from prompt + partial completion (no KV cache at hand: the partial completion is read again
    in one forward pass), with entropies and log-probabilities recorded for the new tokens. Greedy: the tokens of
    :func:`generate_completions` at ``max_new_tokens`` from the start; sampled: a draw from the same distribution
    (not the same draw). Within one run, :func:`evaluate_ladder` resumes from the KV cache instead.

    Args:
        completions: one per prompt, generated with the same settings at a smaller budget.
        Others: as in :func:`generate_completions`.
    """
    _check_budget(max_new_tokens, batch_size)
    if len(completions) != len(prompts):
        raise ValueError(f"`completions` must have one entry per prompt, got {len(completions)} for {len(prompts)}.")
    settings, _ = _sampling(do_sample, temperature, entropy_temperature)
    cut = [i for i, c in enumerate(completions) if c.truncated and c.num_tokens < max_new_tokens]
    prefixes = [completions[i].token_ids for i in cut]
    decoder = _evaluation_decoder(
        model,
        tokenizer,
        [prompts[i] for i in cut],
        prefixes,
        settings,
        batch_size,
        seed,
        progress,
        desc,
        segment_tokens,
    )
    out = list(completions)
    for i, extended in zip(cut, decoder.extend_to(max_new_tokens)):
        old = completions[i]
        extended.token_entropies = old.token_entropies + extended.token_entropies
        extended.token_logprobs = old.token_logprobs + extended.token_logprobs
        out[i] = extended
    return out


def _columns(problems) -> tuple[list, list]:
    prompts = list(problems["prompt"]) if hasattr(problems, "column_names") else [p["prompt"] for p in problems]
    answers = list(problems["answer"]) if hasattr(problems, "column_names") else [p["answer"] for p in problems]
    if not prompts:
        raise ValueError("`problems` must hold at least one problem.")
    return prompts, answers


def _result(
    completions: list[Completion],
    answers: Sequence,
    do_sample: bool,
    temperature: float,
    entropy_temperature: float,
    max_new_tokens: int,
) -> EvaluationResult:
    from .tasks import grade

    correct = [grade(c.text, str(a)) for c, a in zip(completions, answers)]
    return EvaluationResult(
        num_problems=len(completions),
        num_correct=sum(correct),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        entropy_temperature=entropy_temperature,
        max_new_tokens=max_new_tokens,
        completions=completions,
        correct=correct,
    )


def _default_desc(do_sample: bool, temperature: float) -> str:
    return f"Evaluating ({f'sampled, T={temperature:g}' if do_sample else 'greedy'})"


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
    *,
    segment_tokens: int | None = 32,
) -> EvaluationResult:
    """Accuracy and token entropy of one completion per problem.

    Args:
        problems: a dataset (or list of dicts) with ``prompt`` and ``answer`` columns, e.g.
            :meth:`trl_entropy.evaluation.tasks.ArithmeticTask.dataset` or
            :func:`trl_entropy.evaluation.tasks.load_task`.
        Others: as in :func:`generate_completions`.
    """
    prompts, answers = _columns(problems)
    _, entropy_temperature = _sampling(do_sample, temperature, entropy_temperature)
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
        desc=desc or _default_desc(do_sample, temperature),
        segment_tokens=segment_tokens,
    )
    return _result(completions, answers, do_sample, temperature, entropy_temperature, max_new_tokens)


def evaluate_ladder(
    model,
    tokenizer,
    problems,
    budgets: Sequence[int] = (96, 256, 512),
    max_truncated: float = TRUNCATION_WARNING_RATE,
    do_sample: bool = False,
    temperature: float = 1.0,
    entropy_temperature: float | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    progress: bool = True,
    desc: str | None = None,
    *,
    segment_tokens: int | None = 32,
) -> list[EvaluationResult]:
    """:func:`evaluate` at the first budget of ``budgets`` where at most ``max_truncated`` of the answers are cut off
    (an accuracy on cut-off answers partly measures the budget), decoding each token once: each rung continues only
    the completions cut off at the one before, from their KV cache, and records entropies for the new tokens only.

    Each rung's result has the form of :func:`evaluate`'s at that budget. Greedy: the same completions, token for
    token (``tests/evaluation/test_evaluation.py``; see :class:`~trl_entropy.decoding.Decoder` on the last bits of the
    arithmetic). Sampled: a draw from the same distribution as :func:`evaluate` at that budget from the start, not
    the same draw (the random stream is consumed in another order); the stopping rule reads each rung's own draw.

    Args:
        budgets: increasing token budgets, each ``>= 1``.
        max_truncated: largest fraction of cut-off answers at which the ladder stops, in [0, 1].
        Others: as in :func:`evaluate`.

    Returns:
        One :class:`EvaluationResult` per rung decoded, in order: the last is the one to report (check its
        ``truncation_rate`` against ``max_truncated``: above it, the last budget was not enough).
    """
    budgets = list(budgets)
    if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets) or budgets != sorted(set(budgets)):
        raise ValueError(f"`budgets` must be increasing integers >= 1, got {budgets}.")
    if not (0.0 <= max_truncated <= 1.0):
        raise ValueError(f"`max_truncated` must be in [0, 1], got {max_truncated}.")
    _check_budget(budgets[0], batch_size)
    prompts, answers = _columns(problems)
    settings, entropy_temperature = _sampling(do_sample, temperature, entropy_temperature)
    desc = desc or _default_desc(do_sample, temperature)
    decoder = _evaluation_decoder(
        model, tokenizer, prompts, None, settings, batch_size, seed, progress, desc, segment_tokens
    )
    results = []
    for budget in budgets:
        decoder.desc = f"{desc}, budget {budget}"
        completions = decoder.extend_to(budget)
        results.append(_result(completions, answers, do_sample, temperature, entropy_temperature, budget))
        if results[-1].truncation_rate <= max_truncated:
            break
    return results


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
