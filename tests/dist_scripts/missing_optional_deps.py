"""Run by tests/test_faults.py in a fresh interpreter with vllm, deepspeed, matplotlib and wandb made unimportable.

``sys.modules[name] = None`` makes ``import name`` raise ImportError and ``importlib.util.find_spec(name)`` give None,
which is what the package and its dependencies see when the package is not installed. Usage:
``python missing_optional_deps.py OUT_DIR``; prints ``RESULT`` and a JSON object of what each attempt raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

for _name in ("vllm", "deepspeed", "matplotlib", "wandb"):
    sys.modules[_name] = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for trainer_utils

from trainer_utils import TINY_KWARGS, tiny_setup  # noqa: E402

import trl_entropy.confidence  # noqa: E402, F401  (imports without the optional packages)
import trl_entropy.decoding.processors  # noqa: E402
from trl_entropy.callbacks import EntropyStatsCallback  # noqa: E402
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer  # noqa: E402


def attempt(make) -> str:
    try:
        make()
    except Exception as err:  # what the user would see
        return f"{type(err).__name__}: {err}"
    return "no error"


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    model, tokenizer, dataset = tiny_setup()

    def config(name: str, **extra):
        return EntropyGRPOConfig(output_dir=str(out / name), entropy_reward="token", **{**TINY_KWARGS, **extra})

    def trainer(args):
        return EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    run = trainer(config("run"))
    run.add_callback(EntropyStatsCallback(run))
    run.train()
    results["trained_steps"] = run.state.global_step

    def plot():
        from trl_entropy.cli.arguments import PlotArguments
        from trl_entropy.cli.plot import run_plot

        run_plot(PlotArguments(stats_file=str(out / "run" / "entropy_stats.jsonl"), output_dir=str(out / "plots")))

    results["plot"] = attempt(plot)
    results["use_vllm"] = attempt(lambda: trainer(config("vllm", use_vllm=True)))
    results["vllm_adapter"] = attempt(trl_entropy.decoding.processors.make_vllm_logits_processor_class)
    results["deepspeed"] = attempt(lambda: config("deepspeed", deepspeed={"zero_optimization": {"stage": 2}}))
    results["wandb"] = attempt(lambda: trainer(config("wandb", report_to=["wandb"])))
    print("RESULT" + json.dumps(results))


if __name__ == "__main__":
    main()
