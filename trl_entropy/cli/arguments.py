"""The argument dataclasses of every ``trl-entropy`` command, beside the CLI that parses them.

One file on purpose, over the package's ~500-line guideline: it is one thing, the option surface of the command line,
and reads as the reference of every option (help text, range, default).

Each field's ``help`` is what ``trl-entropy <command> --help`` prints; each ``__post_init__`` checks ranges, so a
bad value fails in one line before any model loads. The commands share names for the same things: ``--num_problems``
(how many problems) and ``--output_file`` (where the results go).
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trl import ModelConfig
from trl.scripts.grpo import GRPOScriptArguments

from ..confidence.calibration import THRESHOLD_METHODS
from ..confidence.signals import ConfidenceSignal
from ..decoding.processors import AdaptiveTemperatureConfig, EMInfConfig
from ..files import STATS_FILE_NAME
from ..models import DEFAULT_MODEL

if TYPE_CHECKING:
    from ..callbacks.collapse_guard import CollapseGuardCallback

__all__ = [
    "CollapseGuardArguments",
    "DemoArguments",
    "PlotArguments",
    "DiagnoseArguments",
    "TrainScriptArguments",
    "EntropyModelConfig",
    "GenerateModeArguments",
    "GenerateArguments",
    "CalibrateArguments",
    "EarlyStopGenerateArguments",
]

# Fewer problems can not hold the two correct and two incorrect answers the calibration fit needs.
MIN_CALIBRATION_PROBLEMS = 4


@dataclass
class TrainScriptArguments(GRPOScriptArguments):
    """Data and reward options of ``trl-entropy grpo|rloo|emft``: those of ``trl grpo`` / ``trl rloo`` (TRL's
    ``GRPOScriptArguments``, so a TRL config's `reward_funcs` and `reward_model_name_or_path` keep their meaning),
    with these defaults and additions.

    Parameters:
        dataset_name (`str`, *optional*, defaults to `"arithmetic"`):
            `"arithmetic"` (the built-in "What is a + b?" task, offline) or another built-in task of
            :data:`trl_entropy.evaluation.tasks.TASKS` (`"arithmetic_2digit"`, `"subtraction"`, `"multiplication"`,
            `"word_problems"`, `"sequence"`), a hub dataset id or local folder (`datasets.load_dataset`), or a
            `.json`/`.jsonl`/`.csv`/`.parquet` file. It needs a `prompt` column.
            `trl grpo` requires a dataset; a run on this default says so in one line at start.
        num_train_prompts (`int`, *optional*, defaults to `1024`):
            Number of prompts drawn for a built-in task, >= 1 (ignored for other datasets).
        prompt_style (`str`, *optional*, defaults to `"open"`):
            Prompt of a built-in task (:class:`~trl_entropy.evaluation.tasks.ArithmeticTask`): `"open"` (the
            question alone) or `"short"` (two worked examples first); ignored for other datasets.
        reward_funcs (`list[str]` or `None`, *optional*, defaults to `None`):
            Reward functions: TRL's `accuracy_reward` (reads the `solution` column), `reasoning_accuracy_reward`,
            `think_format_reward`, `get_soft_overlong_punishment` (with `trl grpo`'s settings), `accuracy`
            (:func:`trl_entropy.evaluation.tasks.accuracy_reward`, reads the `answer` column) or a dotted import path
            `my_module.my_reward`. Optional with `--entropy_reward`; not allowed for `emft`.
        reward_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            A sequence-classification reward model (hub id or folder), scored before the reward functions, as in
            `trl grpo`. Not allowed for `emft`.
    """

    dataset_name: str | None = field(
        default="arithmetic",
        metadata={
            "help": "'arithmetic' (the built-in task, offline; the default, unlike `trl grpo`, which requires a "
            "dataset) or another built-in task (arithmetic_2digit, subtraction, multiplication, word_problems, "
            "sequence), a hub dataset id or folder, or a .json/.jsonl/.csv/.parquet file, with a 'prompt' column."
        },
    )
    num_train_prompts: int = field(
        default=1024,
        metadata={"help": "Built-in tasks only (ignored for other data): prompts drawn, >= 1."},
    )
    prompt_style: str = field(
        default="open",
        metadata={
            "help": "Built-in tasks only (ignored for other data): its prompt, 'open' (the question "
            "alone) or 'short' (two worked examples first).",
            "choices": ["open", "short"],
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: TRL's 'accuracy_reward' (needs a 'solution' column), "
            "'reasoning_accuracy_reward', 'think_format_reward', 'get_soft_overlong_punishment', 'accuracy' (needs an "
            "'answer' column) or a dotted import path. Optional when --entropy_reward is set."
        },
    )

    def __post_init__(self):
        if self.num_train_prompts < 1:
            raise ValueError(f"`num_train_prompts` must be >= 1, got {self.num_train_prompts}.")
        if not self.dataset_name:
            raise ValueError("`dataset_name` must be 'arithmetic', a hub dataset id, a folder or a data file.")


@dataclass
class EntropyModelConfig(ModelConfig):
    """TRL's :class:`~trl.ModelConfig` (model loading and LoRA options) with the embedded model as the default.

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"smollm2"`):
            `"smollm2"` (the embedded SmolLM2-135M-Instruct, offline), a hub model id or a local folder.
            `trl grpo` requires a model; a training run on this default says so in one line at start.
    """

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL,
        metadata={"help": "'smollm2' (embedded SmolLM2-135M-Instruct, offline), a hub model id or a local folder."},
    )


@dataclass
class GenerateModeArguments:
    """Which generation pipeline ``trl-entropy generate`` runs.

    Parameters:
        early_stopping (`bool`, *optional*, defaults to `False`):
            `False`: batched generation, optionally with EM-INF or the adaptive temperature
            (:func:`trl_entropy.evaluation.generate.run_generate`). `True`: Think-Just-Enough entropy early stopping
            with a
            calibrated threshold (:func:`trl_entropy.confidence.run_early_stop_generate`); see
            `trl-entropy generate --early_stopping --help` for its options.
    """

    early_stopping: bool = field(
        default=False,
        metadata={
            "help": "Run entropy early stopping (Think Just Enough) instead of EM-INF / plain generation. "
            "`trl-entropy generate --early_stopping --help` lists its options."
        },
    )


@dataclass
class GenerateArguments:
    """Arguments of :func:`run_generate` (the ``trl-entropy generate`` subcommand).

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"smollm2"`):
            `"smollm2"` for the embedded offline SmolLM2-135M-Instruct, or any hub id / local folder.
        prompts_file (`str` or `None`, *optional*, defaults to `None`):
            JSONL file, one object per line with `prompt` (a string or a list of chat messages) and optionally
            `answer`; other fields are copied to the output. When `None`, `task` is used.
        task (`str`, *optional*, defaults to `"arithmetic"`):
            Built-in task when no `prompts_file` is given: an offline task of `trl_entropy.evaluation.tasks.TASKS`
            (`"arithmetic"`, `"arithmetic_2digit"`, `"subtraction"`, `"multiplication"`, `"word_problems"`,
            `"sequence"`; open prompt style) or a hub task of `trl_entropy.evaluation.tasks.load_task` (`"gsm8k"`,
            `"math500"`;
            needs a network or a populated cache).
        num_problems (`int`, *optional*, defaults to `64`):
            Number of task problems (`>= 1`); for a prompts file, `0` keeps every line, else the first ones.
        split (`str`, *optional*, defaults to `"test"`):
            Task split (`"train"` or `"test"` for arithmetic).
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Maximum generated tokens per completion, `>= 1`.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward pass, `>= 1`; a batch holds `max(1, batch_size // num_samples)` prompts.
        do_sample (`bool`, *optional*, defaults to `False`):
            Sample instead of greedy decoding. Required when `num_samples > 1`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature `> 0` (used when `do_sample`). The released EM-INF script samples at 0.1.
        top_k (`int` or `None`, *optional*, defaults to `None`):
            Top-k filtering when sampling (`>= 1`); `None` keeps the model's generation config.
        top_p (`float` or `None`, *optional*, defaults to `None`):
            Nucleus filtering when sampling, in `(0, 1]`; `None` keeps the model's generation config.
        num_samples (`int`, *optional*, defaults to `1`):
            Completions per prompt, `>= 1`; `> 1` is self-consistency: the prediction is the majority vote over
            the extracted answers (ties: the answer seen first).
        em_inf (`bool`, *optional*, defaults to `False`):
            Optimise each step's logits with EM-INF (Agarwal et al., 2025) before the temperature / top-k / top-p.
        em_inf_threshold (`float`, *optional*, defaults to `0.3`):
            EM-INF entropy threshold `delta` in nats (paper: 0.1-0.5).
        em_inf_steps (`int`, *optional*, defaults to `3`):
            EM-INF optimiser steps per decoding step (released script: 3; paper: 5-15).
        em_inf_lr (`float`, *optional*, defaults to `0.1`):
            EM-INF learning rate on the logits.
        em_inf_kl_weight (`float`, *optional*, defaults to `0.05`):
            Weight of the KL to the original distribution in the EM-INF objective.
        em_inf_optimizer (`str`, *optional*, defaults to `"adam"`):
            `"adam"` or `"sgd"`.
        adaptive_temperature (`bool`, *optional*, defaults to `False`):
            Use the paper's adaptive-temperature baseline instead of EM-INF (mutually exclusive with `em_inf`).
        adaptive_temperature_alpha (`float`, *optional*, defaults to `0.5`):
            Target fraction of the initial entropy for the adaptive temperature, in `(0, 1]` (paper: 0.4-0.6).
        apply_chat_template (`bool`, *optional*, defaults to `True`):
            Render prompts with the tokenizer's chat template (plain strings become one user message). Without a
            chat template, or when `False`, message lists are joined and strings are used as they are.
        output_file (`str`, *optional*, defaults to `"outputs/generate.jsonl"`):
            Where the per-prompt JSONL goes.
        summary_file (`str` or `None`, *optional*, defaults to `None`):
            Where the JSON summary goes; `None` uses `output_file` with the suffix `.summary.json`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the task draw and of sampling.
    """

    model_name_or_path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded) or a hub id / path."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "JSONL with 'prompt' and optional 'answer' per line; else `task` is used."}
    )
    task: str = field(
        default="arithmetic",
        metadata={
            "help": "Offline: 'arithmetic', 'arithmetic_2digit', 'subtraction', 'multiplication', "
            "'word_problems', 'sequence'; hub: 'gsm8k', 'math500'."
        },
    )
    num_problems: int = field(default=64, metadata={"help": "Problems to run (0 = all lines of a prompts file)."})
    split: str = field(default="test", metadata={"help": "Task split."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum generated tokens per completion (>= 1)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass (>= 1)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k when sampling (>= 1)."})
    top_p: float | None = field(default=None, metadata={"help": "Top-p when sampling, in (0, 1]."})
    num_samples: int = field(default=1, metadata={"help": "Completions per prompt; > 1 = self-consistency vote."})
    em_inf: bool = field(default=False, metadata={"help": "Apply EM-INF to every decoding step's logits."})
    em_inf_threshold: float = field(default=0.3, metadata={"help": "EM-INF entropy threshold (nats)."})
    em_inf_steps: int = field(default=3, metadata={"help": "EM-INF optimiser steps per decoding step."})
    em_inf_lr: float = field(default=0.1, metadata={"help": "EM-INF learning rate."})
    em_inf_kl_weight: float = field(default=0.05, metadata={"help": "EM-INF KL weight."})
    em_inf_optimizer: str = field(default="adam", metadata={"help": "'adam' or 'sgd'."})
    adaptive_temperature: bool = field(default=False, metadata={"help": "Use the adaptive-temperature baseline."})
    adaptive_temperature_alpha: float = field(default=0.5, metadata={"help": "Target entropy fraction (0, 1]."})
    apply_chat_template: bool = field(default=True, metadata={"help": "Render prompts with the chat template."})
    output_file: str = field(default="outputs/generate.jsonl", metadata={"help": "Per-prompt JSONL output."})
    summary_file: str | None = field(
        default=None, metadata={"help": "JSON summary; None: output_file with the suffix .summary.json."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the task draw and of sampling."})

    def __post_init__(self):
        from ..evaluation.tasks import TASK_NAMES

        if self.prompts_file is None and self.task not in TASK_NAMES:
            raise ValueError(f"`task` must be one of {', '.join(map(repr, TASK_NAMES))}, got {self.task!r}.")
        if self.num_problems < 0 or (self.prompts_file is None and self.num_problems < 1):
            raise ValueError(
                f"`num_problems` must be >= 1 for a task (>= 0 for a prompts file), got {self.num_problems}."
            )
        for name in ("max_new_tokens", "batch_size", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {getattr(self, name)}.")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"`top_k` must be >= 1 or None, got {self.top_k}.")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"`top_p` must be in (0, 1] or None, got {self.top_p}.")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError(
                f"`num_samples` > 1 (got {self.num_samples}) needs `do_sample=True`: greedy samples are identical."
            )
        if self.em_inf and self.adaptive_temperature:
            raise ValueError("`em_inf` and `adaptive_temperature` are alternatives: set at most one of them.")
        # Validate the method settings now rather than after the model has loaded.
        self.em_inf_config()
        self.adaptive_temperature_config()

    def em_inf_config(self) -> EMInfConfig:
        """The :class:`~trl_entropy.decoding.processors.EMInfConfig` these arguments describe."""
        return EMInfConfig(
            threshold=self.em_inf_threshold,
            steps=self.em_inf_steps,
            lr=self.em_inf_lr,
            kl_weight=self.em_inf_kl_weight,
            optimizer=self.em_inf_optimizer,
        )

    def adaptive_temperature_config(self) -> AdaptiveTemperatureConfig:
        """The :class:`~trl_entropy.decoding.processors.AdaptiveTemperatureConfig` these arguments describe."""
        return AdaptiveTemperatureConfig(threshold=self.em_inf_threshold, alpha=self.adaptive_temperature_alpha)


@dataclass
class _EarlyStopTaskArguments:
    """Model, task and decoding settings shared by `calibrate` and `generate`."""

    model_name_or_path: str = field(
        default="smollm2",
        metadata={"help": "Model: 'smollm2' (embedded SmolLM2-135M-Instruct, offline), a hub id or a local folder."},
    )
    task: str = field(
        default="arithmetic",
        metadata={
            "help": "Problems: 'arithmetic' (built in, offline, with the arithmetic_* options), another offline task "
            "of trl_entropy.evaluation.tasks.TASKS ('word_problems', 'sequence'...), or 'gsm8k' / 'math500' "
            "(need the hub)."
        },
    )
    num_problems: int = field(default=20, metadata={"help": "Number of problems, >= 1."})
    split: str = field(default="train", metadata={"help": "Task split: 'train' or 'test' for 'arithmetic'."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic problems and of sampling."})
    arithmetic_low: int = field(default=10, metadata={"help": "Smallest arithmetic operand, >= 0."})
    arithmetic_high: int = field(default=99, metadata={"help": "Largest arithmetic operand, >= arithmetic_low."})
    arithmetic_operations: str = field(
        default="+", metadata={"help": "Arithmetic operators to draw from, a string over '+-*' (e.g. '+*')."}
    )
    instruction: str = field(
        default="Think step by step.",
        metadata={"help": "Text appended to each question, so that there is reasoning to cut (may be empty)."},
    )
    signal_kind: str = field(
        default="topk_entropy",
        metadata={"help": "Token signal: 'topk_entropy' (Think Just Enough) or 'entropy' (full vocabulary)."},
    )
    top_k: int = field(default=20, metadata={"help": "k of the top-k entropy, >= 2; the paper uses 20."})
    base: float = field(
        default=2.0, metadata={"help": "Log base of the entropy, > 0 and != 1; 2 (bits) in the paper."}
    )
    step_delimiter: str = field(
        default="\n\n",
        metadata={"help": "Text that ends a reasoning step; escapes such as '\\n' are decoded (command line)."},
    )
    min_step_tokens: int = field(default=4, metadata={"help": "Tokens before a step delimiter counts, >= 1."})
    max_step_tokens: int = field(default=128, metadata={"help": "Longest first reasoning step, >= 1."})
    max_new_tokens: int = field(
        default=384, metadata={"help": "Most output tokens per problem without early stopping, >= max_step_tokens."}
    )
    batch_size: int = field(default=8, metadata={"help": "Problems per generate call, >= 1."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, > 0 (with do_sample)."})

    def __post_init__(self):
        for name in ("num_problems", "min_step_tokens", "max_step_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.max_step_tokens > self.max_new_tokens:
            raise ValueError(
                f"`max_step_tokens` ({self.max_step_tokens}) must be <= `max_new_tokens` ({self.max_new_tokens})."
            )
        if self.arithmetic_low < 0 or self.arithmetic_high < self.arithmetic_low:
            raise ValueError("`arithmetic_low` must be >= 0 and `arithmetic_high` >= `arithmetic_low`.")
        if not self.arithmetic_operations or set(self.arithmetic_operations) - set("+-*"):
            raise ValueError(
                f"`arithmetic_operations` must be a string over '+-*', got {self.arithmetic_operations!r}."
            )
        if not (self.temperature > 0):
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if "\\" in self.step_delimiter:  # "\\n\\n" typed on a command line means two newlines
            self.step_delimiter = codecs.decode(self.step_delimiter, "unicode_escape")
        if not self.step_delimiter:
            raise ValueError("`step_delimiter` must be a non-empty string.")
        if self.signal_kind not in ("topk_entropy", "entropy"):
            raise ValueError(f"`signal_kind` must be 'topk_entropy' or 'entropy', got {self.signal_kind!r}.")
        ConfidenceSignal(self.signal_kind, self.top_k, self.base)  # validates top_k and base

    @property
    def signal(self) -> ConfidenceSignal:
        return ConfidenceSignal(self.signal_kind, self.top_k, self.base)

    def generation_kwargs(self) -> dict:
        return {"do_sample": True, "temperature": self.temperature} if self.do_sample else {"do_sample": False}


@dataclass
class CalibrateArguments(_EarlyStopTaskArguments):
    """Arguments of ``trl-entropy calibrate``: measure first-step entropy and correctness on a few problems
    (Think Just Enough calibrates on 5-20) and save the fitted thresholds as JSON.

    Each problem runs the full pipeline without early stopping; its label is whether the final answer is correct.
    """

    alpha: float = field(default=0.05, metadata={"help": "Significance level of the separation test, in (0, 1)."})
    method: str = field(
        default="mean",
        metadata={"help": "Default threshold saved with the calibration: 'mean', 'info', 'bayes' or 'universal'."},
    )
    p_value_method: str = field(
        default="auto", metadata={"help": "'auto' (scipy Welch t-test if installed), 'scipy' or 'normal'."}
    )
    output_file: str = field(default="calibration.json", metadata={"help": "Where to write the calibration JSON."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_problems < MIN_CALIBRATION_PROBLEMS:
            raise ValueError(
                f"`num_problems` must be >= {MIN_CALIBRATION_PROBLEMS} for `calibrate` (the fit needs at least 2 "
                f"correct and 2 incorrect answers; the paper uses 5-20), got {self.num_problems}."
            )
        if not (0 < self.alpha < 1):
            raise ValueError(f"`alpha` must be in (0, 1), got {self.alpha}.")
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"`method` must be one of {THRESHOLD_METHODS}, got {self.method!r}.")
        if self.p_value_method not in ("auto", "scipy", "normal"):
            raise ValueError(f"`p_value_method` must be 'auto', 'scipy' or 'normal', got {self.p_value_method!r}.")


@dataclass
class EarlyStopGenerateArguments(_EarlyStopTaskArguments):
    """Arguments of ``trl-entropy generate``: solve problems with entropy early stopping, grade them, and compare
    tokens and accuracy with the same decoding without early stopping."""

    num_problems: int = field(default=64, metadata={"help": "Number of problems, >= 1."})
    split: str = field(default="test", metadata={"help": "Task split: held-out 'test' by default."})
    calibration_path: str | None = field(
        default=None, metadata={"help": "Calibration JSON from `calibrate`; its signal settings are used."}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "Explicit stop threshold (signal units); overrides the calibration's."}
    )
    method: str | None = field(
        default=None, metadata={"help": "Which calibrated threshold: 'mean', 'info', 'bayes', 'universal'."}
    )
    mode: str = field(
        default="two_stage",
        metadata={"help": "'two_stage' (decide after the first step, the paper) or 'online' (check every step)."},
    )
    answer_prompt: str = field(
        default="Therefore, the final answer is", metadata={"help": "Text forced to elicit the answer after a stop."}
    )
    max_answer_tokens: int = field(default=16, metadata={"help": "Tokens generated after `answer_prompt`, >= 1."})
    token_budget: int | None = field(
        default=None,
        metadata={"help": "Average output tokens per problem; saved tokens go to uncertain problems (two_stage)."},
    )
    compare_baseline: bool = field(default=True, metadata={"help": "Also run without early stopping and compare."})
    require_separation: bool = field(
        default=False, metadata={"help": "Refuse a calibration whose signal does not separate correct answers."}
    )
    output_file: str | None = field(
        default="early_stop_results.json", metadata={"help": "Where to write per-problem results and metrics."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.calibration_path is None and self.threshold is None:
            raise ValueError("Give `calibration_path` (from `trl-entropy calibrate`) or an explicit `threshold`.")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            # The signals are entropies (>= 0): a negative threshold would never stop anything.
            raise ValueError(f"`threshold` must be a finite entropy >= 0 (signal units), got {self.threshold}.")
        if self.method is not None and self.method not in THRESHOLD_METHODS:
            raise ValueError(f"`method` must be one of {THRESHOLD_METHODS}, got {self.method!r}.")
        if self.mode not in ("two_stage", "online"):
            raise ValueError(f"`mode` must be 'two_stage' or 'online', got {self.mode!r}.")
        if self.max_answer_tokens < 1:
            raise ValueError(f"`max_answer_tokens` must be >= 1, got {self.max_answer_tokens}.")
        if self.token_budget is not None and (self.token_budget < 1 or self.mode != "two_stage"):
            raise ValueError("`token_budget` must be >= 1 and needs mode='two_stage'.")


@dataclass
class DiagnoseArguments:
    """Arguments of ``trl-entropy diagnose``: before training, measure on a few prompts of the training data whether
    label-free training can help this model (:func:`trl_entropy.evaluation.diagnose.diagnose`), print a verdict with
    its rule and
    numbers, and write ``diagnosis.json`` and ``diagnosis.png`` to `output_dir`.

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"smollm2"`):
            `"smollm2"` (the embedded SmolLM2-135M-Instruct), a hub id or a local folder, as for `trl-entropy grpo`.
        dataset_name (`str`, *optional*, defaults to `"arithmetic"`):
            As for `trl-entropy grpo`: `"arithmetic"`, a hub dataset id or folder, or a data file, with a `prompt`
            column.
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Hub dataset configuration.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split the prompts are drawn from.
        prompt_style (`str`, *optional*, defaults to `"open"`):
            Prompt of a built-in task: `"open"` or `"short"`.
        answer_column (`str` or `None`, *optional*, defaults to `None`):
            Column of reference answers; None: `answer`, else `solution`, when the data has one, else none (the
            label-free quantities only). Naming a column the data lacks is an error.
        num_prompts (`int`, *optional*, defaults to `64`):
            Prompts measured (the first ones of the split), >= 1.
        num_samples (`int`, *optional*, defaults to `4`):
            Samples per prompt at `temperature` (`k` of majority@k and pass@k), >= 2.
        temperature (`float`, *optional*, defaults to `1.0`):
            The training temperature (sampling and the measured entropies), > 0.
        max_completion_length (`int`, *optional*, defaults to `256`):
            Token budget of every completion, >= 1 (TRL's GRPO default; use the training run's).
        batch_size (`int`, *optional*, defaults to `64`):
            Sequences per `generate` call, >= 1.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampling and of the built-in task's prompts.
        output_dir (`str`, *optional*, defaults to `"trl-entropy-diagnose"`):
            Folder of `diagnosis.json` and `diagnosis.png`.
        num_threads (`int` or `None`, *optional*, defaults to `None`):
            torch CPU threads; None keeps torch's choice.
    """

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Model: 'smollm2', a hub id or path."})
    dataset_name: str = field(
        default="arithmetic", metadata={"help": "'arithmetic', a hub dataset id or folder, or a data file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split the prompts come from."})
    prompt_style: str = field(
        default="open",
        metadata={"help": "Built-in 'arithmetic' task's prompt: 'open' or 'short'.", "choices": ["open", "short"]},
    )
    answer_column: str | None = field(
        default=None, metadata={"help": "Reference answer column; None: 'answer' or 'solution' when the data has one."}
    )
    num_prompts: int = field(default=64, metadata={"help": "Prompts measured, >= 1."})
    num_samples: int = field(default=4, metadata={"help": "Samples per prompt (k), >= 2."})
    temperature: float = field(default=1.0, metadata={"help": "Training temperature, > 0."})
    max_completion_length: int = field(default=256, metadata={"help": "Token budget per completion, >= 1."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per generate call, >= 1."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of the built-in task."})
    output_dir: str = field(default="trl-entropy-diagnose", metadata={"help": "Folder of diagnosis.json/png."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default)."})

    def __post_init__(self):
        for name, low in (("num_prompts", 1), ("num_samples", 2), ("max_completion_length", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature}.")
        if self.prompt_style not in ("open", "short"):
            raise ValueError(f"`prompt_style` must be 'open' or 'short', got {self.prompt_style!r}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1 or None, got {self.num_threads}.")


# Hub tasks the demo can evaluate on besides the built-in arithmetic.
DEMO_HUB_TASKS = ("gsm8k", "math500")


@dataclass
class DemoArguments:
    """Arguments of ``trl-entropy demo``. The defaults are the study's protocol in its ``open`` regime, sized for a
    2-core CPU.

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"smollm2"`):
            Model to train: `"smollm2"` (the embedded SmolLM2-135M-Instruct, offline), a hub id or a local folder.
        task (`str`, *optional*, defaults to `"arithmetic"`):
            `"arithmetic"` (built in: "What is a + b?", 1 <= a, b <= 20, offline), or `"gsm8k"` / `"math500"`
            (through `datasets.load_dataset`, needs the hub or a populated cache, and a larger model and budget).
        output_dir (`str`, *optional*, defaults to `"trl-entropy-demo"`):
            Folder for the report, the results JSON, the plots and the training logs.
        prompt_style (`str`, *optional*, defaults to `"open"`):
            Prompt of the arithmetic task: `"open"` (the question alone: the study's regime where EM-RL helps) or
            `"short"` (two worked examples first: the regime where it does not; see the report's study line).
        num_eval_problems (`int`, *optional*, defaults to `64`):
            Held-out problems (disjoint from the training prompts), >= 1; the arithmetic task's test split holds 67
            distinct ones. Below :data:`trl_entropy.evaluation.diagnose.MIN_VERDICT_PROMPTS` (93: where an
            accuracy's 95% interval is within +-10 points, the gap the verdict acts on) the report gives the numbers
            and "too few samples for a verdict" instead of a verdict.
        num_samples (`int`, *optional*, defaults to `4`):
            Samples per held-out problem at `temperature` (majority@k, pass@k), >= 2.
        eval_max_new_tokens (`int`, *optional*, defaults to `256`):
            Token budget of the evaluation, >= 1: where the base model's greedy answers finish with the open prompt
            (the report gives the fraction cut off; the study's own budgets are larger for sampled base answers).
        num_train_prompts (`int`, *optional*, defaults to `512`):
            Unlabelled training prompts, >= 1 (training stops at `max_steps` whichever comes first).
        max_steps (`int`, *optional*, defaults to `30`):
            Optimizer steps of EM-RL, >= 1.
        prompts_per_step (`int`, *optional*, defaults to `2`):
            Prompts per optimizer step, >= 1; each gets `num_generations` completions.
        num_generations (`int`, *optional*, defaults to `4`):
            Completions per prompt (the GRPO group whose mean reward is the baseline), >= 2.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of training and of the sampled evaluation, > 0. The entropy reward is measured at it.
        learning_rate (`float`, *optional*, defaults to `2e-5`):
            AdamW learning rate, > 0 (the study's; 5e-5 collapsed the entropy to a degenerate answer within 30 steps,
            see `benchmarks/bench_collapse.py`).
        beta (`float`, *optional*, defaults to `0.0`):
            KL weight to the initial model, >= 0 (the paper: 0.001). 0 loads no reference model (faster on CPU).
        max_completion_length (`int`, *optional*, defaults to `32`):
            Longest training completion in tokens, >= 1 (the study's; with the open prompt most training completions
            are cut off: training teaches the model to answer within it).
        entropy_reward (`str`, *optional*, defaults to `"token"`):
            EM-RL variant: `"token"`, `"trajectory"` or `"self_certainty"`.
        eval_batch_size (`int`, *optional*, defaults to `64`):
            Sequences per `generate` call in evaluation, >= 1.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the problems, of sampling and of training.
        num_threads (`int` or `None`, *optional*, defaults to `1`):
            CPU threads for torch. 1 by default: a training step took 9.2 s with 1 thread and 7.5 s with torch's 2
            alone on 2 cores, but beside a second such job 9.3 s with 1 thread each and 37 s (up to 63 s) with 2
            each (`bench_label_free.py --step-time-check`). None keeps torch's choice.
        quick (`bool`, *optional*, defaults to `False`):
            Smoke-test mode: 2 training steps, 8 held-out problems, 2 samples, a 32-token evaluation budget.
        save_model (`bool`, *optional*, defaults to `False`):
            Save the trained model to `<output_dir>/model`.
        collapse_guard (`bool`, *optional*, defaults to `False`):
            Watch training with :class:`~trl_entropy.callbacks.collapse_guard.CollapseGuardCallback` (its defaults;
            for the
            arithmetic task a probe of 32 test-split problems drawn with `seed + 1`).
    """

    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path."}
    )
    task: str = field(
        default="arithmetic",
        metadata={"help": "'arithmetic' (built in, offline), 'gsm8k' or 'math500' (need the hub)."},
    )
    output_dir: str = field(default="trl-entropy-demo", metadata={"help": "Folder for report.md, JSON and plots."})
    prompt_style: str = field(
        default="open",
        metadata={"help": "Arithmetic prompt: 'open' (the study's regime where EM-RL helps) or 'short'."},
    )
    num_eval_problems: int = field(default=64, metadata={"help": "Held-out problems, >= 1 (arithmetic: <= 67)."})
    num_samples: int = field(default=4, metadata={"help": "Samples per held-out problem, >= 2."})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Evaluation token budget, >= 1."})
    num_train_prompts: int = field(default=512, metadata={"help": "Unlabelled training prompts, >= 1."})
    max_steps: int = field(default=30, metadata={"help": "EM-RL optimizer steps, >= 1."})
    prompts_per_step: int = field(default=2, metadata={"help": "Prompts per optimizer step, >= 1."})
    num_generations: int = field(default=4, metadata={"help": "Completions per prompt (GRPO group size), >= 2."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of training and of the sampled evaluation, > 0."}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate, > 0."})
    beta: float = field(default=0.0, metadata={"help": "KL weight to the initial model, >= 0 (0: no reference)."})
    max_completion_length: int = field(default=32, metadata={"help": "Longest training completion in tokens, >= 1."})
    entropy_reward: str = field(
        default="token", metadata={"help": "EM-RL variant: 'token', 'trajectory' or 'self_certainty'."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call in evaluation, >= 1."})
    seed: int = field(default=0, metadata={"help": "Seed of problems, sampling and training."})
    num_threads: int | None = field(default=1, metadata={"help": "torch CPU threads; 1 is robust under load."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: 2 steps, 8 held-out problems."})
    save_model: bool = field(default=False, metadata={"help": "Save the trained model to <output_dir>/model."})
    collapse_guard: bool = field(default=False, metadata={"help": "Stop and restore the best probe step on collapse."})

    def __post_init__(self):
        if self.task != "arithmetic" and self.task not in DEMO_HUB_TASKS:
            raise ValueError(f"`task` must be 'arithmetic', 'gsm8k' or 'math500', got {self.task!r}.")
        if self.prompt_style not in ("open", "short"):
            raise ValueError(f"`prompt_style` must be 'open' or 'short', got {self.prompt_style!r}.")
        for name in (
            "num_eval_problems",
            "eval_max_new_tokens",
            "num_train_prompts",
            "max_steps",
            "prompts_per_step",
            "max_completion_length",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        for name in ("num_generations", "num_samples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 2):
                raise ValueError(f"`{name}` must be an integer >= 2, got {value!r}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate}.")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"`beta` must be a finite number >= 0, got {self.beta}.")
        if self.entropy_reward not in ("token", "trajectory", "self_certainty"):
            raise ValueError(
                f"`entropy_reward` must be 'token', 'trajectory' or 'self_certainty', got {self.entropy_reward!r}."
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1 or None, got {self.num_threads}.")
        if self.quick:
            self.max_steps, self.num_eval_problems, self.num_samples, self.eval_max_new_tokens = 2, 8, 2, 32


@dataclass
class PlotArguments:
    """Arguments of ``trl-entropy plot``.

    Parameters:
        stats_file (`str`):
            ``entropy_stats.jsonl`` written by ``EntropyStatsCallback``, or the training ``output_dir`` holding it.
        output_dir (`str` or `None`, *optional*, defaults to `None`):
            Folder for the PNG files; `None` means ``entropy_plots/`` next to the stats file.
        steps (`list[int]` or `None`, *optional*, defaults to `None`):
            Logging steps whose histograms to draw (the nearest logged step is used for each); `None` picks
            ``max_histograms`` evenly spaced steps, first and last included.
        max_histograms (`int`, *optional*, defaults to `5`):
            Number of histograms drawn when ``steps`` is `None`, in [1, 20].
        log_y (`bool`, *optional*, defaults to `False`):
            Log-scale entropy axis for the quantile bands (shows the low quantiles, which sit near 0 nats).
        dpi (`int`, *optional*, defaults to `120`):
            Resolution of the PNG files, in [50, 600].
    """

    stats_file: str = field(metadata={"help": "entropy_stats.jsonl, or the training output_dir that holds it."})
    output_dir: str | None = field(default=None, metadata={"help": "PNG folder; None: <stats dir>/entropy_plots."})
    steps: list[int] | None = field(default=None, metadata={"help": "Steps whose histograms to draw."})
    max_histograms: int = field(default=5, metadata={"help": "Histograms drawn when --steps is not given, [1, 20]."})
    log_y: bool = field(default=False, metadata={"help": "Log-scale entropy axis for the quantile bands."})
    dpi: int = field(default=120, metadata={"help": "PNG resolution, in [50, 600]."})

    def __post_init__(self):
        path = Path(self.stats_file)
        if path.is_dir():
            path = path / STATS_FILE_NAME
        if not path.is_file():
            raise ValueError(f"`stats_file` must be an entropy stats JSONL file or a folder holding one, got {path}.")
        self.stats_file = str(path)
        if self.output_dir is None:
            self.output_dir = str(path.parent / "entropy_plots")
        if not (isinstance(self.max_histograms, int) and 1 <= self.max_histograms <= 20):
            raise ValueError(f"`max_histograms` must be an integer in [1, 20], got {self.max_histograms!r}.")
        if not (isinstance(self.dpi, int) and 50 <= self.dpi <= 600):
            raise ValueError(f"`dpi` must be an integer in [50, 600], got {self.dpi!r}.")
        if self.steps is not None and (not self.steps or any(int(s) < 0 for s in self.steps)):
            raise ValueError(f"`steps` must be a non-empty list of steps >= 0, got {self.steps}.")


@dataclass
class CollapseGuardArguments:
    """Command-line options of the collapse guard (``trl-entropy grpo|rloo|emft --collapse_guard ...``). The thresholds
    keep :class:`~trl_entropy.callbacks.collapse.CollapseGuardConfig`'s measured defaults; the Python API sets every
    field.

    Parameters:
        collapse_guard (`bool`, *optional*, defaults to `False`):
            Attach :class:`CollapseGuardCallback` (after the entropy statistics, so it also reads their repetition
            rate).
        collapse_guard_action (`str`, *optional*, defaults to `"stop_and_restore"`):
            `"warn"`, `"stop"` or `"stop_and_restore"` (see `CollapseGuardConfig.action`).
        collapse_guard_probe (`str` or `None`, *optional*, defaults to `None`):
            Labelled probe problems: `"arithmetic"` (held-out "What is a + b?" problems of the built-in task's test
            split), a `.json`/`.jsonl` file with `prompt` and `answer` fields, or None: `"arithmetic"` when training
            on the built-in task, else no probe (the log signals act alone).
        collapse_guard_probe_size (`int`, *optional*, defaults to `32`):
            Probe problems used, >= 1 (the first ones of a file).
        collapse_guard_probe_every (`int`, *optional*, defaults to `5`):
            Probe evaluation every this many steps, >= 1.
        collapse_guard_probe_max_new_tokens (`int`, *optional*, defaults to `96`):
            Token budget of the greedy probe, >= 1 (pick one where the answers finish; the truncation rate is logged).
        collapse_guard_max_probe_time_fraction (`float`, *optional*, defaults to `0.1`):
            The probes' time budget, a fraction of the training time in [0, 1]; 0 switches the budget off (see
            `CollapseGuardConfig.max_probe_time_fraction`).
    """

    collapse_guard: bool = field(default=False, metadata={"help": "Stop (or flag) a collapsing run."})
    collapse_guard_action: str = field(
        default="stop_and_restore", metadata={"help": "'warn', 'stop' or 'stop_and_restore'."}
    )
    collapse_guard_probe: str | None = field(
        default=None,
        metadata={
            "help": "'arithmetic' or a .json/.jsonl file with prompt/answer; unset: 'arithmetic' when training on the "
            "built-in task, else no probe."
        },
    )
    collapse_guard_probe_size: int = field(default=32, metadata={"help": "Probe problems, >= 1."})
    collapse_guard_probe_every: int = field(default=5, metadata={"help": "Probe every N steps, >= 1."})
    collapse_guard_probe_max_new_tokens: int = field(default=96, metadata={"help": "Probe token budget, >= 1."})
    collapse_guard_max_probe_time_fraction: float = field(
        default=0.1, metadata={"help": "Probe time budget as a fraction of training time, in [0, 1]; 0: no budget."}
    )

    def __post_init__(self):
        from ..callbacks.collapse import ACTIONS

        if self.collapse_guard_action not in ACTIONS:
            raise ValueError(f"`collapse_guard_action` must be one of {ACTIONS}, got {self.collapse_guard_action!r}.")
        for name in ("collapse_guard_probe_size", "collapse_guard_probe_every", "collapse_guard_probe_max_new_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        fraction = self.collapse_guard_max_probe_time_fraction
        if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0 <= fraction <= 1):
            raise ValueError(f"`collapse_guard_max_probe_time_fraction` must be in [0, 1], got {fraction!r}.")
        probe = self.collapse_guard_probe
        if probe is not None and probe != "arithmetic" and not probe.endswith((".json", ".jsonl")):
            raise ValueError(f"`collapse_guard_probe` must be 'arithmetic' or a .json/.jsonl file, got {probe!r}.")

    def probe_file(self) -> str | None:
        """The probe data file, when ``collapse_guard_probe`` names one."""
        probe = self.collapse_guard_probe
        return probe if self.collapse_guard and probe not in (None, "arithmetic") else None

    def check_probe(self) -> None:
        """Refuse, before the model loads, a probe file that does not exist, is not JSON lines, or has a record
        without a usable ``prompt`` or without an ``answer`` (one line naming the option, the file and the line)."""
        from ..data_checks import check_data_file

        path = self.probe_file()
        if path is not None:
            check_data_file(path, option="collapse_guard_probe", required=("prompt", "answer"))

    def build(self, dataset_name: str | None, seed: int) -> CollapseGuardCallback:
        """The callback these options describe (``dataset_name`` picks the default probe)."""
        from ..callbacks.collapse_guard import CollapseGuardCallback

        probe_name = self.collapse_guard_probe or ("arithmetic" if dataset_name == "arithmetic" else None)
        probe = None
        if probe_name == "arithmetic":
            from ..evaluation.tasks import ArithmeticTask

            # seed + 1: other problems than the CLI's own arithmetic eval split (drawn with `seed`).
            probe = ArithmeticTask().dataset(self.collapse_guard_probe_size, split="test", seed=seed + 1)
        elif probe_name is not None:
            from datasets import load_dataset

            self.check_probe()

            probe = load_dataset("json", data_files=probe_name, split="train")
            probe = probe.select(range(min(self.collapse_guard_probe_size, len(probe))))
        return CollapseGuardCallback(
            probe_problems=probe,
            action=self.collapse_guard_action,
            probe_every=self.collapse_guard_probe_every,
            probe_max_new_tokens=self.collapse_guard_probe_max_new_tokens,
            max_probe_time_fraction=self.collapse_guard_max_probe_time_fraction or None,
        )
