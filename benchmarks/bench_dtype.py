"""One training step of the demo's configuration in the dtype the CLI picks, against ``bf16=True`` and ``bf16=False``.

TRL's configs default to ``bf16=True``; with ``use_cpu=True`` the Trainer then autocasts to bfloat16 on the CPU. Where
the CPU has native bf16 (AVX-512 BF16 / AMX) that is fast; where it has not (AVX2-only AMD EPYC) torch falls back to a
reference GEMM. The CLI, the demo, the benchmarks and the examples therefore train with
``bf16=trl_entropy.hardware.default_bf16()``: bf16 where the CPU has it natively, float32 elsewhere. This script
measures the three side by side in one process: the variants train in turn, one step each (learning rate 0, so that
every variant keeps the same weights and samples the same completions: the step times are paired), on the embedded
SmolLM2-135M-Instruct with the demo's EM-RL settings (2 prompts x 4 completions, 32 tokens, T = 1, entropy reward).

A CPU without native bf16 can be emulated on one that has it by capping oneDNN's and ATen's instruction sets:
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_dtype.py --tag avx2_emulated``
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is then False, as on an AVX2-only EPYC). The JSON records which.

    python benchmarks/bench_dtype.py [--steps 4] [--warmup 1] [--threads 1] [--tag NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402
from _interleave import run_interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="first steps per variant left out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--tag", default=None, help="results go to bench_dtype[_TAG].json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_entropy.cli.demo import DemoArguments
    from trl_entropy.evaluation.tasks import ArithmeticTask
    from trl_entropy.hardware import default_bf16, machine_record
    from trl_entropy.models import default_model_path
    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

    demo = DemoArguments()
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = ArithmeticTask(prompt_style=demo.prompt_style).dataset(64, "train").select_columns(["prompt"])
    cli_default = default_bf16(use_cpu=True)
    variants = {"cli_default": cli_default, "bf16_true": True, "bf16_false": False}
    trainers = {}
    for name, bf16 in variants.items():
        config = EntropyGRPOConfig(
            output_dir=f"/tmp/bench_dtype/{name}",
            entropy_reward=demo.entropy_reward,
            temperature=demo.temperature,
            learning_rate=0.0,  # paired: every variant keeps the initial weights (the step's cost is the same)
            beta=demo.beta,
            num_generations=demo.num_generations,
            per_device_train_batch_size=demo.prompts_per_step * demo.num_generations,
            max_completion_length=demo.max_completion_length,
            max_steps=args.warmup + args.steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
            use_cpu=True,
            bf16=bf16,
            activation_checkpointing=False,
            disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(path)
        trainers[name] = EntropyGRPOTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer
        )
    summary = run_interleaved(trainers, warmup=args.warmup)
    fastest = min(summary[name]["median_step_s"] for name in variants)
    rows = [
        {
            "variant": name,
            "bf16": variants[name],
            "median_step_s": summary[name]["median_step_s"],
            "vs_bf16_false": summary[name]["median_step_s"] / summary["bf16_false"]["median_step_s"],
            "vs_fastest": summary[name]["median_step_s"] / fastest,
        }
        for name in variants
    ]
    print_table(rows, ["variant", "bf16", "median_step_s", "vs_bf16_false", "vs_fastest"])
    payload = {
        "machine": machine_record(),
        "emulation": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ},
        "settings": {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "completions_per_step": demo.prompts_per_step * demo.num_generations,
            "max_completion_length": demo.max_completion_length,
            "entropy_reward": demo.entropy_reward,
            "warmup_steps": args.warmup,
            "measured_steps": args.steps,
            "threads": args.threads,
        },
        "cli_default_bf16": cli_default,
        "variants": {name: {**summary[name], "bf16": variants[name]} for name in variants},
        "rows": rows,
    }
    write_results("bench_dtype" + (f"_{args.tag}" if args.tag else ""), payload)


if __name__ == "__main__":
    main()
