"""Reasoning tasks: built-in synthetic tasks that need no network (:data:`TASKS`), real datasets through
``datasets.load_dataset`` when a network is there, and answer grading with ``math-verify``.

Built-in task families, each seeded and offline, each in the ``"open"`` and ``"short"`` prompt styles
(:data:`PROMPT_STYLES`), each with an integer answer graded by :func:`grade` (the last ``\\boxed{}`` or number):

- arithmetic (:class:`ArithmeticTask`): "What is a + b?" and other operations and operand ranges;
- two-step word problems (:class:`WordProblemTask`): "Tom has 3 apples. He buys 4 more and then gives 2 to a
  friend. How many apples does Tom have now?";
- a symbolic task (:class:`SequenceTask`): the next term of an arithmetic sequence, "What number comes next in the
  sequence 3, 7, 11, 15?".

:func:`load_task` builds any of them by name (:data:`TASKS`), next to the hub tasks ``gsm8k`` and ``math500``.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

__all__ = [
    "PROMPT_STYLES",
    "TASKS",
    "TASK_NAMES",
    "ArithmeticTask",
    "SequenceTask",
    "WordProblemTask",
    "accuracy_reward",
    "build_task",
    "extract_answer",
    "grade",
    "load_task",
]

SYSTEM_PROMPT = "Answer with the final number only."

PROMPT_STYLES = ("open", "short")
SHORT_ANSWER_EXAMPLES = ((3, 4), (12, 9))
"""Operand pairs of the two worked examples that open every ``prompt_style="short"`` arithmetic prompt."""

SPLITS = ("train", "test")
_SPLIT_SEED_OFFSET = {"train": 0, "test": 1_000_003}
TEST_FRACTION_BUCKETS = 4
"""A task with question-disjoint splits puts a question in ``test`` when ``crc32(question) % 4 == 0`` (about a
quarter of all questions), else in ``train``: a held-out question is never a training question."""


def question_split(question: str) -> str:
    """The split (``"train"`` or ``"test"``) that owns ``question`` in tasks with question-disjoint splits: a fixed
    function of the text (CRC-32, stable across Python runs, unlike ``hash``)."""
    return "test" if zlib.crc32(question.encode("utf-8")) % TEST_FRACTION_BUCKETS == 0 else "train"


def _render_prompt(question: str, examples: list[tuple[str, str]], conversational: bool) -> str | list[dict]:
    """The prompt of ``question``: the system prompt, the worked ``examples`` as earlier turns (``"short"`` style;
    none for ``"open"``), then the question; a list of chat messages, or plain text."""
    if conversational:
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}]
        for example_question, example_answer in examples:
            prompt += [
                {"role": "user", "content": example_question},
                {"role": "assistant", "content": example_answer},
            ]
        prompt.append({"role": "user", "content": question})
        return prompt
    shots = "".join(f"{q}\n{a}\n" for q, a in examples)
    return f"{SYSTEM_PROMPT}\n{shots}{question}\n" if examples else f"{question} {SYSTEM_PROMPT}\n"


def _check_style(prompt_style: str) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"`prompt_style` must be one of {PROMPT_STYLES}, got {prompt_style!r}.")


class _SyntheticTask:
    """What every built-in task shares: seeded draws, the two splits and grading. A task defines ``_draw(rng)`` (one
    row), ``_disjoint_splits`` (whether a question belongs to one split only) and ``_example_questions`` (the worked
    examples of the short prompt, never drawn as problems)."""

    _disjoint_splits: bool = True
    _example_questions: frozenset[str] = frozenset()

    def _draw(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def dataset(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        """``n`` problems drawn with ``seed`` (the same ``(n, split, seed)`` gives the same rows), with columns
        ``prompt``, ``question`` and ``answer`` (the label, never used by the label-free trainers, only by evaluation
        and by accuracy rewards). Questions may repeat within a split (i.i.d. draws)."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"`n` must be an integer >= 1, got {n!r}.")
        if split not in SPLITS:
            raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
        rng = random.Random(seed + _SPLIT_SEED_OFFSET[split])
        rows: list[dict] = []
        # Every task's question space holds both splits many times over; the cap only turns a bug into an error.
        for _ in range(1000 * n):
            row = self._draw(rng)
            if row["question"] in self._example_questions:
                continue
            if self._disjoint_splits and question_split(row["question"]) != split:
                continue
            rows.append(row)
            if len(rows) == n:
                return Dataset.from_list(rows)
        raise ValueError(f"{type(self).__name__} has too few {split!r} questions to draw {n} problems from.")

    def grade(self, completion: str | list[dict], answer: str) -> bool:
        """Whether ``completion``'s final answer (the last ``\\boxed{}`` or number) equals ``answer``."""
        return grade(completion, answer)


@dataclass
class ArithmeticTask(_SyntheticTask):
    """Synthetic "What is a + b?" problems with ``low <= a, b <= high``.

    With ``disjoint_splits=False`` (the default, the committed study's draws) train and held-out splits come from
    disjoint seeds, so a held-out problem is never a training prompt by construction of the draw (the same pair may
    still occur by chance in both, as in any i.i.d. split). With ``disjoint_splits=True`` a question belongs to one
    split only (:func:`question_split`).

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
        disjoint_splits: whether ``train`` and ``test`` hold disjoint questions (False: disjoint seeds only, as the
            study drew them).
    """

    low: int = 1
    high: int = 20
    operations: tuple[str, ...] = ("+",)
    conversational: bool = True
    prompt_style: str = "open"
    disjoint_splits: bool = False

    def __post_init__(self):
        if self.low < 0 or self.high < self.low:
            raise ValueError(f"`low` must be >= 0 and `high` >= `low`, got low={self.low}, high={self.high}.")
        bad = set(self.operations) - {"+", "-", "*"}
        if not self.operations or bad:
            raise ValueError(f"`operations` must be a non-empty subset of ('+', '-', '*'), got {self.operations}.")
        _check_style(self.prompt_style)
        self._disjoint_splits = self.disjoint_splits
        # The short prompt's worked examples are never drawn (the study's draws, not disjoint, may hold them).
        if self.disjoint_splits:
            self._example_questions = frozenset(
                f"What is {a} {op} {b}?" for op in self.operations for a, b in SHORT_ANSWER_EXAMPLES
            )

    def _examples(self, op: str) -> list[tuple[str, str]]:
        """``(question, answer)`` worked examples of ``op`` for the short-answer prompt (empty for "open")."""
        if self.prompt_style == "open":
            return []
        return [(f"What is {a} {op} {b}?", f"{a} {op} {b} = {_apply(a, op, b)}") for a, b in SHORT_ANSWER_EXAMPLES]

    def _draw(self, rng: random.Random) -> dict:
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        return self.problem(a, rng.choice(self.operations), b)

    def problem(self, a: int, op: str, b: int) -> dict:
        """The row of the problem "What is ``a op b``?": ``prompt`` (in this task's prompt style), ``question`` and
        ``answer``."""
        if op not in self.operations:
            raise ValueError(f"`op` must be one of this task's operations {self.operations}, got {op!r}.")
        question = f"What is {a} {op} {b}?"
        prompt = _render_prompt(question, self._examples(op), self.conversational)
        return {"prompt": prompt, "question": question, "answer": str(_apply(a, op, b))}


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


_PEOPLE = (("Tom", "He"), ("Anna", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Mia", "She"))
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books")
_WORD_TEMPLATES = (
    # (text, signs of the second and third numbers): every problem is two steps, a first change then a second one
    ("{name} has {a} {item}. {pronoun} buys {b} more and then gives {c} to a friend.", (1, -1)),
    ("{name} has {a} {item}. {pronoun} gives {b} to a friend and then finds {c} more.", (-1, 1)),
    ("{name} has {a} {item}. {pronoun} buys {b} more and then gets {c} more as a gift.", (1, 1)),
)
_WORD_EXAMPLES = (
    (
        "Ann has 5 pens. She buys 3 more and then gives 2 to a friend. How many pens does Ann have now?",
        "5 + 3 - 2 = 6",
    ),
    (
        "Joe has 9 cards. He gives 4 to a friend and then finds 2 more. How many cards does Joe have now?",
        "9 - 4 + 2 = 7",
    ),
)


@dataclass
class WordProblemTask(_SyntheticTask):
    """Two-step word problems: "Tom has 3 apples. He buys 4 more and then gives 2 to a friend. How many apples does
    Tom have now?" (answer 5). Each problem starts with ``low <= a <= high`` items and applies two changes of
    ``low..high`` items each (buy / get: add; give away: subtract), never going below zero. Train and test hold
    disjoint questions (:func:`question_split`).

    Args:
        low: smallest number in a problem (>= 1).
        high: largest number in a problem (>= low).
        conversational: chat-format prompts (a list of messages) instead of plain text.
        prompt_style: ``"open"`` (the system prompt and the question) or ``"short"`` (two worked examples first,
            answered as one equation: "5 + 3 - 2 = 6").
    """

    low: int = 1
    high: int = 10
    conversational: bool = True
    prompt_style: str = "open"

    def __post_init__(self):
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"`low` must be >= 1 and `high` >= `low`, got low={self.low}, high={self.high}.")
        _check_style(self.prompt_style)
        self._example_questions = frozenset(q for q, _ in _WORD_EXAMPLES)

    def _draw(self, rng: random.Random) -> dict:
        (name, pronoun), item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
        template, (sign_b, sign_c) = rng.choice(_WORD_TEMPLATES)
        a = rng.randint(self.low, self.high)
        b = rng.randint(self.low, a) if sign_b < 0 else rng.randint(self.low, self.high)  # never below zero
        after_first = a + sign_b * b  # >= low whenever the second change subtracts (template 0 adds first)
        c = rng.randint(self.low, after_first) if sign_c < 0 else rng.randint(self.low, self.high)
        text = template.format(name=name, pronoun=pronoun, item=item, a=a, b=b, c=c)
        question = f"{text} How many {item} does {name} have now?"
        examples = list(_WORD_EXAMPLES) if self.prompt_style == "short" else []
        prompt = _render_prompt(question, examples, self.conversational)
        answer = after_first + sign_c * c
        return {"prompt": prompt, "question": question, "answer": str(answer)}


_SEQUENCE_EXAMPLES = (
    ("What number comes next in the sequence 2, 4, 6, 8?", "8 + 2 = 10"),
    ("What number comes next in the sequence 5, 8, 11, 14?", "14 + 3 = 17"),
)


@dataclass
class SequenceTask(_SyntheticTask):
    """A symbolic task: the next term of an arithmetic sequence, "What number comes next in the sequence 3, 7, 11,
    15?" (answer 19): a start in ``low..high``, a step in ``1..max_step``, ``length`` terms shown. Train and test
    hold disjoint questions (:func:`question_split`).

    Args:
        low: smallest first term (>= 0).
        high: largest first term (>= low).
        max_step: largest step between terms (>= 1); steps are positive.
        length: terms shown (>= 3, so the step is shown twice).
        conversational: chat-format prompts (a list of messages) instead of plain text.
        prompt_style: ``"open"`` or ``"short"`` (two worked examples first, answered "8 + 2 = 10").
    """

    low: int = 1
    high: int = 20
    max_step: int = 5
    length: int = 4
    conversational: bool = True
    prompt_style: str = "open"

    def __post_init__(self):
        if self.low < 0 or self.high < self.low:
            raise ValueError(f"`low` must be >= 0 and `high` >= `low`, got low={self.low}, high={self.high}.")
        if self.max_step < 1:
            raise ValueError(f"`max_step` must be >= 1, got {self.max_step}.")
        if self.length < 3:
            raise ValueError(f"`length` must be >= 3, got {self.length}.")
        _check_style(self.prompt_style)
        self._example_questions = frozenset(q for q, _ in _SEQUENCE_EXAMPLES)

    def _draw(self, rng: random.Random) -> dict:
        start, step = rng.randint(self.low, self.high), rng.randint(1, self.max_step)
        terms = [start + i * step for i in range(self.length)]
        question = f"What number comes next in the sequence {', '.join(map(str, terms))}?"
        examples = list(_SEQUENCE_EXAMPLES) if self.prompt_style == "short" else []
        prompt = _render_prompt(question, examples, self.conversational)
        return {"prompt": prompt, "question": question, "answer": str(terms[-1] + step)}


TASKS: dict[str, Callable[..., _SyntheticTask]] = {
    "arithmetic": lambda **kw: ArithmeticTask(**kw),
    "arithmetic_2digit": lambda **kw: ArithmeticTask(low=10, high=49, **kw),
    "subtraction": lambda **kw: ArithmeticTask(low=1, high=20, operations=("-",), disjoint_splits=True, **kw),
    "multiplication": lambda **kw: ArithmeticTask(low=2, high=12, operations=("*",), disjoint_splits=True, **kw),
    "word_problems": lambda **kw: WordProblemTask(**kw),
    "sequence": lambda **kw: SequenceTask(**kw),
}
"""The built-in offline tasks by name (each takes ``conversational`` and ``prompt_style``):

- ``arithmetic``: "What is a + b?", 1 <= a, b <= 20 (the committed study's task; seed-disjoint splits);
- ``arithmetic_2digit``: the same with 10 <= a, b <= 49 (the study's ``open_2digit`` variant);
- ``subtraction``: "What is a - b?", 1 <= a, b <= 20 (negative answers included), question-disjoint splits;
- ``multiplication``: "What is a * b?", 2 <= a, b <= 12, question-disjoint splits;
- ``word_problems``: :class:`WordProblemTask`; ``sequence``: :class:`SequenceTask`."""


def build_task(name: str, **kwargs: Any) -> _SyntheticTask:
    """The built-in task ``name`` of :data:`TASKS`, with ``kwargs`` (``prompt_style``, ``conversational``)."""
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[name](**kwargs)


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


TASK_NAMES = (*TASKS, *_HUB_TASKS)
"""Every name :func:`load_task` accepts: the built-in offline tasks of :data:`TASKS`, then the hub tasks."""


def load_task(
    name: str, n: int | None = None, split: str = "test", seed: int = 0, prompt_style: str = "open"
) -> Dataset:
    """A task as a dataset with ``prompt``/``question``/``answer`` columns.

    Args:
        name: a built-in offline task of :data:`TASKS` (``"arithmetic"``, ``"word_problems"``, ``"sequence"``...),
            or ``"gsm8k"`` / ``"math500"`` through ``datasets.load_dataset`` (needs a network or a populated HF cache).
        n: number of problems (all of the hub split when None; 64 for a built-in task when None).
        split: ``"train"`` or ``"test"`` for a built-in task; the hub split otherwise.
        seed: seed of the synthetic draw.
        prompt_style: ``"open"`` or ``"short"`` for a built-in task (:data:`PROMPT_STYLES`); hub tasks have one.
    """
    if name in TASKS:
        return build_task(name, prompt_style=prompt_style).dataset(n or 64, split=split, seed=seed)
    if name not in _HUB_TASKS:
        raise ValueError(f"`name` must be one of {list(TASK_NAMES)}, got {name!r}.")
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
