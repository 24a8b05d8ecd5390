"""Entropy early stopping ("Think Just Enough", Sharma & Chopra, 2025, arXiv 2510.08146).

The mean top-20 token entropy (bits) of a model's first reasoning step is a confidence signal: calibrate a threshold
on a few labelled problems, then answer right away when the first step is confident and keep reasoning otherwise. The
calibration reports whether the signal separates correct from incorrect answers at all (Cohen's d and a Welch test):
the paper found that it does on reasoning models and does not on a plain instruct model.

    python examples/early_stopping.py                               # embedded SmolLM2-135M-Instruct, ~2 min on CPU
    python examples/early_stopping.py --num_calibration 20 --num_problems 64 --max_new_tokens 256
"""

from dataclasses import dataclass, field

from trl import TrlParser

from trl_entropy.confidence import ConfidenceSignal, EntropyThresholdCalibrator, think_just_enough_generate
from trl_entropy.evaluation.tasks import ArithmeticTask, grade
from trl_entropy.models import load_model


@dataclass
class ExampleArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded), a hub id or a path."})
    num_calibration: int = field(default=12, metadata={"help": "Labelled problems for the calibration (paper: 5-20)."})
    num_problems: int = field(default=16, metadata={"help": "Held-out problems solved with early stopping."})
    method: str = field(default="mean", metadata={"help": "Threshold: 'mean', 'info', 'bayes' or 'universal'."})
    max_step_tokens: int = field(default=48, metadata={"help": "Longest first reasoning step (tokens)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most output tokens per problem without stopping."})
    batch_size: int = field(default=8, metadata={"help": "Problems per generate call."})


def problems(n: int, split: str):
    data = ArithmeticTask(low=10, high=99).dataset(n, split=split)
    # No "final number only" system prompt here: the model should reason, so that there is something to cut.
    prompts = [[{"role": "user", "content": f"{q} Think step by step."}] for q in data["question"]]
    return prompts, data["answer"]


def main(argv=None):
    (args,) = TrlParser(ExampleArguments).parse_args_and_config(argv)
    model, tokenizer = load_model(args.model_name_or_path)
    signal = ConfidenceSignal("topk_entropy", top_k=20, base=2.0)  # the paper's signal
    settings = dict(
        signal=signal,
        max_step_tokens=args.max_step_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )

    # 1. Calibrate on labelled problems: full reasoning, first-step entropy and correctness of each.
    prompts, answers = problems(args.num_calibration, "train")
    results = think_just_enough_generate(model, tokenizer, prompts, threshold=None, **settings)
    correct = [grade(r.completion, a) for r, a in zip(results, answers)]
    calibrator = EntropyThresholdCalibrator(method=args.method, signal=signal)
    try:
        calibrator.fit([r.step_signal for r in results], correct)
        threshold = calibrator.threshold()
        print(calibrator.summary())
    except ValueError as err:  # e.g. fewer than 2 correct answers: the statistics are undefined
        signals = sorted(r.step_signal for r in results)
        threshold = signals[len(signals) // 2]
        print(f"Calibration impossible ({err}); using the median first-step entropy {threshold:.3f} bits instead.")

    # 2. Held-out problems with and without early stopping (the same decoding otherwise).
    prompts, answers = problems(args.num_problems, "test")
    for name, tau in (("full reasoning", None), (f"early stopping (tau={threshold:.3f})", threshold)):
        results = think_just_enough_generate(model, tokenizer, prompts, threshold=tau, **settings)
        accuracy = sum(grade(r.completion, a) for r, a in zip(results, answers)) / len(results)
        tokens = sum(r.num_tokens for r in results) / len(results)
        early = sum(r.confident for r in results) / len(results)
        print(f"{name}: accuracy {accuracy:.1%}, {tokens:.1f} tokens/problem, {early:.0%} answered after step 1")


if __name__ == "__main__":
    main()
