"""Reasoning tasks: a built-in synthetic arithmetic task that needs no network, real datasets through
``datasets.load_dataset`` when a network is there, and answer grading with ``math-verify``."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from datasets import Dataset

__all__ = ["PROMPT_STYLES", "ArithmeticTask", "extract_answer", "grade", "accuracy_reward", "load_task"]

SYSTEM_PROMPT = "Answer with the final number only."

PROMPT_STYLES = ("open", "short")
SHORT_ANSWER_EXAMPLES = ((3, 4), (12, 9))
"""Operand pairs of the two worked examples that open every ``prompt_style="short"`` prompt."""


@dataclass
class ArithmeticTask:
    """Synthetic "What is a + b?" problems with ``low <= a, b <= high``.

    Train and held-out splits come from disjoint seeds, so a held-out problem is never a training prompt by
    construction of the draw (the same pair may still occur by chance in both, as in any i.i.d. split).

    Args:
        low: smallest operand (>= 0).
        high: largest operand (>= low).
        operations: operators to draw from, among ``"+"``, ``"-"``, ``"*"``.
        conversational: emit chat-format prompts (a list of messages) instead of plain text.
        prompt_style: ``"open"``: the system prompt and the question only; a small instruct model then mostly
            explains at length (SmolLM2-135M-Instruct, T=1: mean 107 tokens, many answers unfinished at 256 tokens),
            so an evaluation at a short budget measures truncation as much as arithmetic. ``"short"``: the same
            system prompt, then two worked examples as earlier chat turns ("What is 3 + 4?" -> "3 + 4 = 7") before
            the question, so answers are one short equation (measured on 64 held-out problems with SmolLM2-135M-
            Instruct: 100% of greedy and 98.4% of T=1 samples finish within 32 tokens). Base and trained models
            get the same prompt, so a gain is not a change of format.
    """

    low: int = 1
    high: int = 20
    operations: tuple[str, ...] = ("+",)
    conversational: bool = True
    prompt_style: str = "open"

    def __post_init__(self):
        if self.low < 0 or self.high < self.low:
            raise ValueError(f"`low` must be >= 0 and `high` >= `low`, got low={self.low}, high={self.high}.")
        bad = set(self.operations) - {"+", "-", "*"}
        if not self.operations or bad:
            raise ValueError(f"`operations` must be a non-empty subset of ('+', '-', '*'), got {self.operations}.")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"`prompt_style` must be one of {PROMPT_STYLES}, got {self.prompt_style!r}.")

    def _examples(self, op: str) -> list[tuple[str, str]]:
        """``(question, answer)`` worked examples of ``op`` for the short-answer prompt (empty for "open")."""
        if self.prompt_style == "open":
            return []
        return [(f"What is {a} {op} {b}?", f"{a} {op} {b} = {_apply(a, op, b)}") for a, b in SHORT_ANSWER_EXAMPLES]

    def _problem(self, rng: random.Random) -> dict:
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        return self.problem(a, rng.choice(self.operations), b)

    def problem(self, a: int, op: str, b: int) -> dict:
        """The row of the problem "What is ``a op b``?": ``prompt`` (in this task's prompt style), ``question`` and
        ``answer``."""
        if op not in self.operations:
            raise ValueError(f"`op` must be one of this task's operations {self.operations}, got {op!r}.")
        answer = _apply(a, op, b)
        question = f"What is {a} {op} {b}?"
        examples = self._examples(op)
        if self.conversational:
            prompt = [{"role": "system", "content": SYSTEM_PROMPT}]
            for example_question, example_answer in examples:
                prompt += [
                    {"role": "user", "content": example_question},
                    {"role": "assistant", "content": example_answer},
                ]
            prompt.append({"role": "user", "content": question})
        else:
            shots = "".join(f"{q}\n{a}\n" for q, a in examples)
            prompt = f"{SYSTEM_PROMPT}\n{shots}{question}\n" if examples else f"{question} {SYSTEM_PROMPT}\n"
        return {"prompt": prompt, "question": question, "answer": str(answer)}

    def dataset(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        """``n`` problems with columns ``prompt``, ``question`` and ``answer`` (the label, never used by the
        label-free trainers, only by evaluation)."""
        if n < 1:
            raise ValueError(f"`n` must be >= 1, got {n}.")
        offset = {"train": 0, "test": 1_000_003}.get(split)
        if offset is None:
            raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
        rng = random.Random(seed + offset)
        return Dataset.from_list([self._problem(rng) for _ in range(n)])


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(completion: str | list[dict]) -> str | None:
    """The final answer of a completion: the content of the last ``\\boxed{}`` if any, else the last number."""
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def grade(completion: str | list[dict], answer: str) -> bool:
    """Whether ``completion``'s final answer equals ``answer``.

    Uses ``math-verify`` (symbolic equivalence: ``1/2 == 0.5``, LaTeX) when installed, else exact numeric
    comparison of the extracted answer.
    """
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    try:
        from math_verify import parse, verify
    except ImportError:
        try:
            return abs(float(predicted) - float(answer)) < 1e-9
        except ValueError:
            return predicted.strip() == answer.strip()
    gold = parse(f"${answer}$")
    return bool(gold) and bool(verify(gold, parse(f"${predicted}$")))


def accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """A TRL reward function: 1.0 for a correct final answer, else 0.0 (reads the dataset's ``answer`` column)."""
    return [float(grade(c, a)) for c, a in zip(completions, answer)]


_HUB_TASKS = {
    # name: (dataset id, config, split, question column, answer column)
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
}


def load_task(name: str, n: int | None = None, split: str = "test", seed: int = 0) -> Dataset:
    """A task as a dataset with ``prompt``/``question``/``answer`` columns.

    Args:
        name: ``"arithmetic"`` (built in, offline), or ``"gsm8k"`` / ``"math500"`` through ``datasets.load_dataset``
            (needs a network or a populated HF cache).
        n: number of problems (all of the hub split when None; required for ``"arithmetic"``).
        split: ``"train"`` or ``"test"`` for ``"arithmetic"``; the hub split otherwise.
        seed: seed of the synthetic draw.
    """
    if name == "arithmetic":
        return ArithmeticTask().dataset(n or 64, split=split, seed=seed)
    if name not in _HUB_TASKS:
        raise ValueError(f"`name` must be 'arithmetic' or one of {sorted(_HUB_TASKS)}, got {name!r}.")
    from datasets import load_dataset

    repo, config, default_split, question_col, answer_col = _HUB_TASKS[name]
    data = load_dataset(repo, config, split=split if split != "test" else default_split)
    if n is not None:
        data = data.select(range(min(n, len(data))))

    def to_row(example):
        answer = str(example[answer_col])
        if name == "gsm8k":  # GSM8K answers end with "#### <number>"
            answer = answer.split("####")[-1].strip().replace(",", "")
        question = example[question_col]
        return {
            "prompt": [
                {"role": "system", "content": "Put the final answer in \\boxed{}."},
                {"role": "user", "content": question},
            ],
            "question": question,
            "answer": answer,
        }

    return data.map(to_row, remove_columns=data.column_names)
