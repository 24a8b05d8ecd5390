"""What ``trl-entropy generate`` runs: load the model and the prompts (a JSONL file or a built-in task), generate with
EM-INF, adaptive temperature or plain decoding, vote, grade, and write one JSONL row per prompt plus a JSON summary.

Example::

    from trl_entropy.cli.arguments import GenerateArguments
    from trl_entropy.cli.generate import run_generate

    # EM-INF as in the released script: logits optimisation, then sampling at temperature 0.1.
    summary = run_generate(GenerateArguments(em_inf=True, do_sample=True, temperature=0.1, num_problems=32))
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from ..data_checks import check_data_file, check_model_inputs
from ..decoding.processors import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor
from ..evaluation.accuracy import TRUNCATION_WARNING_RATE
from ..evaluation.generate import generate_completions, load_prompts, render_prompt, score_completions
from ..evaluation.tasks import extract_answer, grade
from ..files import write_atomically
from .arguments import GenerateArguments

logger = logging.getLogger(__name__)

__all__ = ["GenerateJob", "build_logits_processors", "prepare_generate", "run_generate"]


def build_logits_processors(args: GenerateArguments) -> list[LogitsProcessor]:
    """The EM-INF or adaptive-temperature processor the arguments ask for (empty list for plain decoding)."""
    if args.em_inf:
        return [EMInfLogitsProcessor.from_config(args.em_inf_config(), track_stats=True)]
    if args.adaptive_temperature:
        return [AdaptiveTemperatureLogitsProcessor(config=args.adaptive_temperature_config())]
    return []


def load_task_problems(task: str, num_problems: int | None, split: str, seed: int) -> list[dict[str, Any]]:
    """The problems of ``--task`` as rows, or one ``ValueError`` line naming ``task`` (an unknown name, or a hub
    task that can not be read here)."""
    from ..evaluation.tasks import TASK_NAMES, load_task

    if task not in TASK_NAMES:
        raise ValueError(f"`task` must be one of {list(TASK_NAMES)}, got {task!r}.")
    try:
        return list(load_task(task, num_problems, split=split, seed=seed))
    except ValueError:
        raise
    except Exception as err:  # a hub task without network or cache: datasets' errors have no common base class
        raise ValueError(f"`task`: {task!r} could not be loaded ({type(err).__name__}: {err}).") from err


def _load_problems(args: GenerateArguments) -> list[dict[str, Any]]:
    """The rows to generate for, read and checked before any model loads: a prompts file (every line a JSON object
    with a usable `prompt`, named by line when not) or the task's problems."""
    if args.prompts_file is not None:
        check_data_file(args.prompts_file, option="prompts_file", required=("prompt",))
        rows = load_prompts(args.prompts_file)
        return rows[: args.num_problems] if args.num_problems else rows
    return load_task_problems(args.task, args.num_problems, args.split, args.seed)


@dataclass
class GenerateJob:
    """Checked prompts of ``trl-entropy generate``; the model loads in :meth:`run`."""

    args: GenerateArguments
    problems: list[dict[str, Any]]

    def run(self) -> dict[str, Any]:
        return _generate(self.args, self.problems)


def prepare_generate(args: GenerateArguments) -> GenerateJob:
    """Read and check the prompts (and the model folder, and that every prompt fits the model's context with
    ``max_new_tokens``) without loading the model; one-line ``ValueError`` on anything wrong."""
    problems = _load_problems(args)
    where = args.prompts_file or f"task {args.task!r}"
    option = "prompts_file" if args.prompts_file else "task"
    prompts = [p["prompt"] for p in problems]
    check_model_inputs(args.model_name_or_path, prompts, where, args.max_new_tokens, option, "max_new_tokens")
    return GenerateJob(args, problems)


def run_generate(
    args: GenerateArguments,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Run :class:`GenerateArguments`: generate, vote, score, and write ``args.output_file`` (one JSON object per
    prompt) and the summary file. A preloaded ``model``/``tokenizer`` may be passed to skip loading. The prompts are
    read and checked before the model loads.

    Returns:
        The summary (also written to disk): accuracy and its 95% Wilson interval when answers are known, generated
        tokens, wall time, EM-INF statistics when EM-INF is on, and the arguments.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("Pass both `model` and `tokenizer`, or neither.")
    if model is None:
        return prepare_generate(args).run()
    return _generate(args, _load_problems(args), model, tokenizer)


def _generate(
    args: GenerateArguments,
    problems: list[dict[str, Any]],
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(args.model_name_or_path)
    model.eval()
    prompts = [render_prompt(tokenizer, p["prompt"], args.apply_chat_template) for p in problems]
    processors = build_logits_processors(args)
    start = time.perf_counter()
    completions = generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        logits_processors=processors,
        seed=args.seed,
        add_special_tokens=not (args.apply_chat_template and getattr(tokenizer, "chat_template", None)),
    )
    seconds = time.perf_counter() - start
    answers = [p.get("answer") for p in problems]
    records, summary = score_completions(completions, answers, parse_answer=extract_answer, is_correct=grade)
    lines = []
    for index, (problem, record) in enumerate(zip(problems, records)):
        extra = {k: v for k, v in problem.items() if k not in record}
        lines.append(json.dumps({"index": index, **extra, **record}, ensure_ascii=False))
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output, ("\n".join(lines) + "\n").encode("utf-8"))
    summary["max_new_tokens"] = args.max_new_tokens
    if summary["truncation_rate"] is not None and summary["truncation_rate"] > TRUNCATION_WARNING_RATE:
        logger.warning(
            "%.1f%% of the completions were cut off at max_new_tokens=%d: an accuracy measured on them partly "
            "measures the budget; raise max_new_tokens until at most %.0f%% are.",
            100 * summary["truncation_rate"],
            args.max_new_tokens,
            100 * TRUNCATION_WARNING_RATE,
        )
    summary["seconds"] = seconds
    summary["generated_tokens_per_second"] = summary["total_generated_tokens"] / seconds if seconds > 0 else None
    if args.em_inf:
        summary["em_inf_stats"] = processors[0].stats
    summary["arguments"] = asdict(args)
    summary_path = Path(args.summary_file) if args.summary_file else output.with_suffix(".summary.json")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(summary_path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    summary["output_file"], summary["summary_file"] = str(output), str(summary_path)
    return summary
