"""What ``trl-entropy diagnose`` runs: read the prompts (and answers) of the training data exactly as ``trl-entropy
grpo`` reads them, check them before the model loads, run :func:`trl_entropy.evaluation.diagnose.diagnose` with the
built-in
answer parsing and grading, print the verdict, and write ``diagnosis.json`` and ``diagnosis.png``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trl import DatasetMixtureConfig

from ..data_checks import check_model_inputs, check_training_dataset
from ..evaluation.diagnose import TOO_FEW_SAMPLES
from ..files import json_safe, write_atomically
from .arguments import DiagnoseArguments, TrainScriptArguments
from .train import _load_datasets

__all__ = ["DiagnosisJob", "parse_answer", "prepare_diagnosis", "run_diagnose"]

_ANSWER_COLUMNS = ("answer", "solution")  # the built-in task's, then TRL's accuracy_reward's


def parse_answer(text: str) -> str | None:
    """The built-in answer parsing: the last ``\\boxed{}`` or number
    (:func:`trl_entropy.evaluation.tasks.extract_answer`),
    normalised so that equal numbers vote together."""
    from ..evaluation.generate import normalize_answer
    from ..evaluation.tasks import extract_answer

    return normalize_answer(extract_answer(text))


@dataclass
class DiagnosisJob:
    """Checked prompts and answers; the model loads in :meth:`run`."""

    args: DiagnoseArguments
    prompts: list
    answers: list[str] | None
    source: str
    answer_column: str | None

    def run(self) -> dict[str, Any]:
        import torch

        from ..callbacks.plots import plot_diagnosis
        from ..evaluation.diagnose import diagnose
        from ..evaluation.tasks import grade
        from ..models import load_model

        args = self.args
        if args.num_threads is not None:
            torch.set_num_threads(args.num_threads)
        start = time.perf_counter()
        model, tokenizer = load_model(args.model_name_or_path)
        model.eval()
        result = diagnose(
            model,
            tokenizer,
            self.prompts,
            self.answers,
            parse_answer=parse_answer,
            is_correct=grade,
            num_samples=args.num_samples,
            temperature=args.temperature,
            max_new_tokens=args.max_completion_length,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        result["arguments"] = asdict(args)
        result["data"] = {"source": self.source, "answer_column": self.answer_column}
        result["seconds"] = time.perf_counter() - start
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        write_atomically(output / "diagnosis.json", (json.dumps(json_safe(result), indent=2) + "\n").encode())
        try:
            result["png"] = str(plot_diagnosis(result, output / "diagnosis.png"))
        except ImportError as err:  # matplotlib is optional: the numbers are what matters
            result["png"] = None
            print(f"No plot: {err}")
        print(render_summary(result))
        return result


def prepare_diagnosis(args: DiagnoseArguments) -> DiagnosisJob:
    """Load and check the prompts and answers without loading the model; one-line ``ValueError`` on bad data."""
    script_args = TrainScriptArguments(
        dataset_name=args.dataset_name,
        dataset_config=args.dataset_config,
        dataset_train_split=args.dataset_train_split,
        num_train_prompts=args.num_prompts,
        prompt_style=args.prompt_style,
    )
    data, _, source = _load_datasets(script_args, DatasetMixtureConfig(), args.seed, with_eval=False)
    check_training_dataset(data, source, args.dataset_train_split)
    columns = list(data.column_names)
    if args.answer_column is not None and args.answer_column not in columns:
        raise ValueError(
            f"`answer_column`: {source} has no column {args.answer_column!r} (columns: {', '.join(columns)}); name "
            "the column of reference answers, or leave it unset for the label-free quantities only."
        )
    answer_column = args.answer_column or next((c for c in _ANSWER_COLUMNS if c in columns), None)
    rows = data.select(range(min(args.num_prompts, len(data))))
    answers = None
    if answer_column is not None:
        answers = [str(a) for a in rows[answer_column]]
        if not any(a.strip() for a in answers):
            raise ValueError(f"`answer_column`: the column {answer_column!r} of {source} holds no answer.")
    prompts = list(rows["prompt"])
    where = f"split {args.dataset_train_split!r} of {source}"
    check_model_inputs(args.model_name_or_path, prompts, where, args.max_completion_length)
    return DiagnosisJob(args, prompts, answers, source, answer_column)


def run_diagnose(args: DiagnoseArguments) -> dict[str, Any]:
    """Run ``trl-entropy diagnose`` (:func:`prepare_diagnosis`, then the measurement)."""
    return prepare_diagnosis(args).run()


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def render_summary(result: dict[str, Any]) -> str:
    """The lines ``trl-entropy diagnose`` prints: the measured quantities, then the verdict, its rule and numbers."""
    settings, greedy, sampled = result["settings"], result["greedy"], result["sampled"]
    k, budget = settings["num_samples"], settings["max_new_tokens"]
    lines = [
        f"Diagnosis of {settings['num_prompts']} prompts, {k} samples each at T={settings['temperature']:g}, budget "
        f"{budget} tokens ({result.get('seconds', 0):.0f} s):",
    ]
    for name, entry in (("greedy", greedy), (f"sampled T={settings['temperature']:g}", sampled)):
        accuracy = f"accuracy {_pct(entry['accuracy'])}, " if "accuracy" in entry else ""
        lines.append(
            f"  {name}: {accuracy}parsed {_pct(entry['parse_rate'])}, mean length {entry['mean_length']:.1f} tokens, "
            f"{_pct(entry['truncation_rate'])} cut off at {budget} tokens, token entropy "
            f"{entry['mean_token_entropy']:.3f} nats"
        )
    if result["has_answers"]:
        lines.append(f"  majority@{k} {_pct(result['majority_at_k'])}, pass@{k} {_pct(result['pass_at_k'])}")
        for name, key in (("minus sequence entropy", "sequence_entropy"), ("mean log-probability", "mean_logprob")):
            sep = result["confidence"][key]
            if sep is None:
                lines.append(f"  confidence ({name}): not measurable (too few correct or incorrect samples)")
                continue
            low, high = sep["auroc_ci95"]
            lines.append(
                f"  confidence ({name}) vs correctness: AUROC {sep['auroc']:.2f} [{low:.2f}, {high:.2f}], Cohen's d "
                f"{sep['cohens_d']:+.2f}, Mann-Whitney p {sep['mann_whitney_p']:.2g} ({sep['num_correct']} correct, "
                f"{sep['num_incorrect']} incorrect samples)"
            )
    else:
        lines.append("  no reference answers: label-free quantities only")
    free = result["label_free"]
    lines.append(
        f"  label-free: {_pct(free['majority_agreement'])} of samples agree with their prompt's majority answer, "
        f"{free['mean_distinct_answers']:.2f} distinct answers per prompt, greedy = majority on "
        f"{_pct(free['greedy_is_majority'])} of prompts, sequence-entropy std {free['sequence_entropy_std']:.3f}"
    )
    verdict = result["verdict"]
    if verdict["verdict"] == TOO_FEW_SAMPLES:
        lines.append(f"Verdict: none, {TOO_FEW_SAMPLES}: {verdict['reason']}.")
    elif result["has_answers"]:
        lines.append(f"Verdict: label-free training is {verdict['verdict']}: {verdict['reason']}.")
    else:
        lines.append(f"Verdict: none: {verdict['reason']}.")
    lines.append(f"Rule: {verdict['rule']}.")
    if verdict.get("validation"):
        lines.append(f"Validation: {verdict['validation']}")
    return "\n".join(lines)
