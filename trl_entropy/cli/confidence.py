"""What ``trl-entropy calibrate`` and ``trl-entropy generate --early_stopping`` run: load the model and the problems,
run the pipeline of :mod:`trl_entropy.confidence`, grade, write the results."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..confidence.calibration import EntropyThresholdCalibrator
from ..confidence.pipeline import think_just_enough_generate
from ..data_checks import check_model_inputs
from ..evaluation.tasks import ArithmeticTask, grade
from ..files import json_safe, write_atomically
from .arguments import CalibrateArguments, EarlyStopGenerateArguments, _EarlyStopTaskArguments
from .generate import load_task_problems

logger = logging.getLogger(__name__)

__all__ = [
    "EarlyStopJob",
    "prepare_calibrate",
    "prepare_early_stop_generate",
    "problems_path",
    "run_calibrate",
    "run_early_stop_generate",
]


def _load_problems(args: _EarlyStopTaskArguments) -> tuple[list[list[dict]], list[str]]:
    if args.task == "arithmetic":
        task = ArithmeticTask(args.arithmetic_low, args.arithmetic_high, tuple(args.arithmetic_operations))
        data = task.dataset(args.num_problems, split=args.split, seed=args.seed)
    else:
        rows = load_task_problems(args.task, args.num_problems, args.split, args.seed)
        data = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
    # The task's own system prompt asks for the bare number; here the model should reason, so only the question.
    prompts = [[{"role": "user", "content": f"{q} {args.instruction}".strip()}] for q in data["question"]]
    return prompts, [str(a) for a in data["answer"]]


def _pipeline_kwargs(args: _EarlyStopTaskArguments) -> dict:
    return {
        "signal": args.signal,
        "step_delimiter": args.step_delimiter,
        "min_step_tokens": args.min_step_tokens,
        "max_step_tokens": args.max_step_tokens,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "generation_kwargs": args.generation_kwargs(),
    }


def _load_model(args: _EarlyStopTaskArguments):
    from ..models import load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_name_or_path)
    model.eval()
    return model, tokenizer


def problems_path(output_file: str | os.PathLike) -> Path:
    """Where ``calibrate`` writes its per-problem measurements: ``<output_file stem>.problems.jsonl``."""
    path = Path(output_file)
    return path.with_name(f"{path.stem}.problems.jsonl")


def _fit_advice(correct: list[bool], signals: list[float]) -> str:
    """What to change when the fit fails, from what was measured."""
    if not any(correct):
        return (
            "no answer was correct: give the model a longer budget (--max_new_tokens), easier problems, or a stronger "
            "--model_name_or_path"
        )
    if all(correct):
        return "every answer was correct: use more (--num_problems) or harder problems (--arithmetic_high)"
    if not all(math.isfinite(v) for v in signals):
        return "some first steps were empty: raise --max_step_tokens or lower --min_step_tokens"
    return "use more problems (--num_problems), a longer budget (--max_new_tokens) or another model"


@dataclass
class EarlyStopJob:
    """Checked problems (and calibration) of ``calibrate`` / ``generate --early_stopping``; the model loads in
    :meth:`run`."""

    args: _EarlyStopTaskArguments
    prompts: list[list[dict]]
    answers: list[str]
    calibrator: EntropyThresholdCalibrator | None = None

    def run(self) -> Any:
        if isinstance(self.args, CalibrateArguments):
            return _calibrate(self)
        return _early_stop_generate(self)


def _prepare(args: _EarlyStopTaskArguments, calibrator: EntropyThresholdCalibrator | None = None) -> EarlyStopJob:
    prompts, answers = _load_problems(args)
    check_model_inputs(args.model_name_or_path, prompts, f"task {args.task!r}", args.max_new_tokens, "task",
                       "max_new_tokens")  # fmt: skip
    return EarlyStopJob(args, prompts, answers, calibrator)


def prepare_calibrate(args: CalibrateArguments) -> EarlyStopJob:
    """Draw and check the problems and the model folder of ``calibrate`` without loading the model."""
    return _prepare(args)


def prepare_early_stop_generate(args: EarlyStopGenerateArguments) -> EarlyStopJob:
    """Read the calibration (``calibration_path``: it must exist and be valid) and draw the problems of ``generate
    --early_stopping`` without loading the model."""
    calibrator = None
    if args.calibration_path is not None:
        if not os.path.isfile(args.calibration_path):
            raise ValueError(
                f"`calibration_path`: no such file {args.calibration_path!r}; create one with `trl-entropy calibrate` "
                "or give an explicit `--threshold`."
            )
        calibrator = EntropyThresholdCalibrator.load(args.calibration_path)
        if args.require_separation and not calibrator.separates:
            raise ValueError(
                f"`require_separation`: the calibration {args.calibration_path} does not separate correct from "
                f"incorrect answers: {calibrator.summary()}"
            )
    return _prepare(args, calibrator)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in rows)
    write_atomically(path, lines.encode("utf-8"))


def run_calibrate(args: CalibrateArguments) -> EntropyThresholdCalibrator:
    """Calibrate the stop threshold on ``args.num_problems`` problems, save it to ``args.output_file`` and print the
    summary. Returns the fitted calibrator.

    The per-problem measurements (first-step signal, correctness, completion) are written (atomically) to
    :func:`problems_path` before the fit, so a failed fit keeps what the generation cost."""
    return prepare_calibrate(args).run()


def _calibrate(job: EarlyStopJob) -> EntropyThresholdCalibrator:
    args, prompts, answers = job.args, job.prompts, job.answers
    model, tokenizer = _load_model(args)
    results = think_just_enough_generate(model, tokenizer, prompts, threshold=None, **_pipeline_kwargs(args))
    correct = [grade(r.completion, a) for r, a in zip(results, answers)]
    signals = [r.step_signal for r in results]
    measured = problems_path(args.output_file)
    rows = []
    for prompt, answer, result, ok in zip(prompts, answers, results, correct):
        row = {"prompt": prompt[-1]["content"], "answer": answer, "correct": ok, "step_signal": result.step_signal}
        row.update(first_step_tokens=result.first_step_tokens, num_tokens=result.num_tokens)
        row["completion"] = result.completion
        rows.append(row)
    _write_jsonl(measured, rows)
    print(f"Per-problem first-step signal and correctness written to {measured}")
    calibrator = EntropyThresholdCalibrator(args.alpha, args.method, args.p_value_method, args.signal)
    try:
        calibrator.fit(signals, correct)
    except ValueError as err:
        raise ValueError(
            f"calibration failed: {err} ({sum(correct)} of {len(correct)} correct; measurements kept in {measured}). "
            f"To fix: {_fit_advice(correct, signals)}."
        ) from err
    path = calibrator.save(args.output_file)
    print(calibrator.summary())
    print(f"Saved to {path}")
    return calibrator


def run_early_stop_generate(args: EarlyStopGenerateArguments) -> dict:
    """Solve ``args.num_problems`` problems with early stopping (and, with ``compare_baseline``, without), grade
    them, print a comparison and write per-problem results to ``args.output_file`` (atomically). Returns the
    metrics."""
    return prepare_early_stop_generate(args).run()


def _early_stop_generate(job: EarlyStopJob) -> dict:
    args, prompts, answers = job.args, job.prompts, job.answers
    signal, threshold, calibration = args.signal, args.threshold, None
    if job.calibrator is not None:
        calibrator = job.calibrator
        signal = calibrator.signal  # the threshold is only meaningful in the signal it was calibrated on
        if not calibrator.separates:
            message = calibrator.summary()
            logger.warning("Early stopping with a calibration that does not separate:\n%s", message)
        if threshold is None:
            threshold = calibrator.threshold(args.method)
        calibration = {"path": args.calibration_path, **asdict(calibrator.stats)}
    model, tokenizer = _load_model(args)
    kwargs = {**_pipeline_kwargs(args), "signal": signal, "mode": args.mode, "answer_prompt": args.answer_prompt}
    kwargs.update(max_answer_tokens=args.max_answer_tokens, token_budget=args.token_budget)

    def evaluate(tau: float | None) -> tuple[dict, list[dict]]:
        results = think_just_enough_generate(model, tokenizer, prompts, threshold=tau, **kwargs)
        rows = [{**asdict(r), "answer": a, "correct": grade(r.completion, a)} for r, a in zip(results, answers)]
        for row in rows:
            row.pop("completion_ids")
        metrics = {
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "mean_tokens": sum(r["num_tokens"] for r in rows) / len(rows),
            "total_tokens": sum(r["num_tokens"] for r in rows),
            "answered_early": sum(r["confident"] for r in rows) / len(rows),
        }
        return metrics, rows

    early, early_rows = evaluate(threshold)
    report: dict[str, Any] = {"threshold": threshold, "signal": asdict(signal), "calibration": calibration}
    report["early_stopping"] = early
    print(
        f"early stopping (tau={threshold:.4f}): accuracy {early['accuracy']:.3f}, "
        f"{early['mean_tokens']:.1f} tokens/problem, {early['answered_early']:.0%} answered after the first step"
    )
    if args.compare_baseline:
        base, base_rows = evaluate(None)
        report["baseline"] = base
        report["token_saving"] = 1.0 - early["total_tokens"] / max(1, base["total_tokens"])
        report["accuracy_change"] = early["accuracy"] - base["accuracy"]
        print(
            f"without early stopping:   accuracy {base['accuracy']:.3f}, {base['mean_tokens']:.1f} tokens/problem; "
            f"saving {report['token_saving']:.1%}, accuracy change {report['accuracy_change']:+.3f}"
        )
    if args.output_file:
        payload = {"args": asdict(args), "metrics": report, "results": early_rows}
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(args.output_file, json.dumps(json_safe(payload), indent=2, allow_nan=False).encode("utf-8"))
    return report
