"""The built-in task suite: answers computed right (checked against a hand-made or independent computation), graded
right and wrong on hand-made completions, deterministic draws, disjoint splits, and the registry behind load_task."""

import re

import pytest

from trl_entropy.evaluation.tasks import (
    TASK_NAMES,
    TASKS,
    ArithmeticTask,
    SequenceTask,
    WordProblemTask,
    build_task,
    grade,
    load_task,
    question_split,
)

STUDY_TASKS = (
    "arithmetic",
    "arithmetic_2digit",
)  # the committed study's draws: seed-disjoint splits, kept as they were
NEW_TASKS = [name for name in TASKS if name not in STUDY_TASKS]


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("style", ["open", "short"])
def test_dataset_is_deterministic_and_has_the_columns(name, style):
    task = build_task(name, prompt_style=style)
    first, again = task.dataset(40, "test", seed=5), task.dataset(40, "test", seed=5)
    assert first.to_list() == again.to_list()
    assert first.column_names == ["prompt", "question", "answer"]
    assert task.dataset(40, "test", seed=6)["question"] != first["question"]
    row = first[0]
    messages = row["prompt"]
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": row["question"]}
    assert len(messages) == (2 if style == "open" else 6)  # system, (2 worked examples as user/assistant), question


@pytest.mark.parametrize("name", NEW_TASKS)
def test_new_tasks_have_question_disjoint_splits(name):
    task = build_task(name)
    train = set(task.dataset(300, "train", seed=0)["question"])
    test = set(task.dataset(100, "test", seed=0)["question"])
    assert train and test and not (train & test)
    assert all(question_split(q) == "test" for q in test) and all(question_split(q) == "train" for q in train)


def test_study_arithmetic_draws_are_unchanged():
    # The committed study's problems must not move: the default task draws as before (seed-disjoint splits, pairs
    # drawn in this order with random.Random(seed + offset)).
    import random

    rng = random.Random(3 + 1_000_003)
    expected = []
    for _ in range(5):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rng.choice(("+",))
        expected.append((f"What is {a} + {b}?", str(a + b)))
    data = load_task("arithmetic", 5, split="test", seed=3)
    assert list(zip(data["question"], data["answer"])) == expected


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


@pytest.mark.parametrize("name", ["subtraction", "multiplication", "arithmetic_2digit"])
def test_arithmetic_variants_answer_their_question(name):
    op = {"subtraction": "-", "multiplication": "*", "arithmetic_2digit": "+"}[name]
    for row in load_task(name, 50, split="train", seed=1):
        a, b = _numbers(row["question"])
        assert row["question"] == f"What is {a} {op} {b}?"
        assert int(row["answer"]) == {"-": a - b, "*": a * b, "+": a + b}[op]


def test_word_problem_answers_follow_the_story():
    # An independent reading of each question's text: buys / finds / gets add, gives subtracts.
    for row in WordProblemTask().dataset(100, "train", seed=2):
        text = row["question"]
        start = int(re.search(r"has (\d+)", text).group(1))
        total = start
        for verb, number in re.findall(r"(buys|gives|finds|gets) (\d+)", text):
            total += -int(number) if verb == "gives" else int(number)
        assert int(row["answer"]) == total >= 0
        assert len(re.findall(r"(buys|gives|finds|gets) \d+", text)) == 2  # two steps


def test_sequence_answers_continue_the_sequence():
    for row in SequenceTask().dataset(100, "train", seed=2):
        terms = _numbers(row["question"])
        step = terms[1] - terms[0]
        assert step >= 1 and all(b - a == step for a, b in zip(terms, terms[1:])) and len(terms) == 4
        assert int(row["answer"]) == terms[-1] + step


def test_hand_made_problems_and_their_grades():
    task = WordProblemTask(prompt_style="short")
    prompt = task.dataset(1)[0]["prompt"]
    assert prompt[1]["content"].startswith("Ann has 5 pens") and prompt[2]["content"] == "5 + 3 - 2 = 6"
    # Right and wrong answers to hand-made problems, as a model writes them.
    cases = [
        (ArithmeticTask(operations=("-",)).problem(3, "-", 11), "3 - 11 = -8", "3 - 11 = 8"),
        (ArithmeticTask(operations=("*",)).problem(7, "*", 8), "7 * 8 = 56", "7 * 8 = 54"),
        (ArithmeticTask(low=10, high=49).problem(38, "+", 47), "The answer is 85.", "38 + 47 = 75"),
    ]
    for row, right, wrong in cases:
        assert grade(right, row["answer"]) and not grade(wrong, row["answer"])
    word = "Tom has 3 apples. He buys 4 more and then gives 2 to a friend. How many apples does Tom have now?"
    assert grade("3 + 4 - 2 = 5", "5") and grade("Tom has 5 apples now.", "5")
    assert not grade("Tom has 3 + 4 = 7 apples.", "5") and not grade(word, "5")  # the question's last number is 2
    assert grade("The next number is 19.", "19") and grade("15 + 4 = \\boxed{19}", "19")
    assert not grade("3, 7, 11, 15", "19") and not grade("no idea", "19")
    assert SequenceTask().grade([{"role": "assistant", "content": "19"}], "19")  # chat completions too


def test_load_task_registry_and_bad_names():
    assert set(TASKS) <= set(TASK_NAMES) and {"gsm8k", "math500"} <= set(TASK_NAMES)
    short = load_task("sequence", 3, split="test", seed=0, prompt_style="short")
    assert len(short) == 3 and len(short[0]["prompt"]) == 6
    with pytest.raises(ValueError, match="word_problems"):
        load_task("nope", 3)
    with pytest.raises(ValueError, match="prompt_style"):
        build_task("sequence", prompt_style="long")
    with pytest.raises(ValueError, match="split"):
        SequenceTask().dataset(3, split="validation")
    with pytest.raises(ValueError, match="max_step"):
        SequenceTask(max_step=0)
    with pytest.raises(ValueError, match="low"):
        WordProblemTask(low=0)


def test_short_prompt_examples_are_never_drawn():
    examples = {"What is 3 * 4?", "What is 12 * 9?"}
    questions = set(build_task("multiplication").dataset(400, "train", seed=0)["question"])
    assert not (questions & examples)
    plain = WordProblemTask(conversational=False, prompt_style="short").dataset(1)[0]["prompt"]
    assert plain.startswith("Answer with the final number only.\nAnn has 5 pens") and plain.endswith("now?\n")
