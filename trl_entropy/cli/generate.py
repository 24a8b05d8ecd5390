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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from ..evaluation import TRUNCATION_WARNING_RATE
from ..files import write_atomically
from ..generate import generate_completions, load_prompts, render_prompt, score_completions
from ..inference import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor
from ..tasks import extract_answer, grade
from .arguments import GenerateArguments

logger = logging.getLogger(__name__)

__all__ = ["build_logits_processors", "run_generate"]


def build_logits_processors(args: GenerateArguments) -> list[LogitsProcessor]:
    """The EM-INF or adaptive-temperature processor the arguments ask for (empty list for plain decoding)."""
    if args.em_inf:
        return [EMInfLogitsProcessor.from_config(args.em_inf_config(), track_stats=True)]
    if args.adaptive_temperature:
        return [AdaptiveTemperatureLogitsProcessor(config=args.adaptive_temperature_config())]
    return []


def _load_problems(args: GenerateArguments) -> list[dict[str, Any]]:
    if args.prompts_file is not None:
        rows = load_prompts(args.prompts_file)
        return rows[: args.num_problems] if args.num_problems else rows
    from ..tasks import load_task

    return list(load_task(args.task, args.num_problems, split=args.split, seed=args.seed))


def run_generate(
    args: GenerateArguments,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Run :class:`GenerateArguments`: generate, vote, score, and write ``args.output_file`` (one JSON object per
    prompt) and the summary file. A preloaded ``model``/``tokenizer`` may be passed to skip loading.

    Returns:
        The summary (also written to disk): accuracy and its 95% Wilson interval when answers are known, generated
        tokens, wall time, EM-INF statistics when EM-INF is on, and the arguments.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("Pass both `model` and `tokenizer`, or neither.")
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(args.model_name_or_path)
    model.eval()
    problems = _load_problems(args)
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
