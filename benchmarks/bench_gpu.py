"""GPU benchmark in one short call: the entropy ops against TRL's fused kernel, GRPO/RLOO step overhead of the entropy
variants, EM-FT against SFT, and EM-INF / adaptive-temperature decoding against plain sampling.

Model: random weights in the shape of Qwen2.5-0.5B (24 layers, hidden 896, vocabulary 151,936, tied embeddings),
built on the spot in bfloat16; nothing is downloaded. Tokenizer: the tiny WordLevel tokenizer of
``trl_entropy.testing``, kept in memory apart from the model (a tokenizer saved into a Qwen2 model folder would be
loaded as Qwen2's BPE class and encode the WordLevel vocabulary as nothing). Token ids the tokenizer does not know
decode to nothing, which the rule reward does not mind. Every comparison is measured side by side in one run:

* **ops**: bfloat16 logits ``[--batch, --seq, 151936]``; every repeat runs each variant once, in turn (round robin),
  after one warm-up call (which compiles the Triton kernels). Extra memory is ``torch.cuda.max_memory_allocated``
  minus the memory allocated before the call (the backward variants include the gradient of the logits). Target:
  ``token_entropy`` within 1.3x of TRL's ``entropy_from_logits`` (forward) and of TRL's
  ``selective_log_softmax_and_entropy`` (forward + backward), with at most 64 MiB of extra memory in the forward.
* **grpo**, **rloo**: one trainer per variant (plain TRL with a rule reward; ``entropy_reward`` token and trajectory;
  the forking-token mask at 0.2; TRL's own ``top_entropy_quantile=0.2``, GRPO only since TRL's RLOO has none), all
  built from one model, ``learning_rate=0`` so that every variant keeps the same weights, and stepped in turn, one
  step each, reseeded with the step number (benchmarks/_interleave.py's baton): step i samples the same completions
  in every variant. ``min_new_tokens`` pins the completion length. Peak memory per step is
  ``torch.cuda.max_memory_allocated`` after a reset at the step's start, minus the memory allocated at its start.
* **emft**: EMFTTrainer (sample, then minimise the mean token entropy) against TRL's SFTTrainer on the same number of
  prompt + completion tokens (random completion ids), stepped in turn the same way.
* **decode**: ``model.generate`` sampling ``--decode-tokens`` new tokens for ``--decode-batch`` prompts, plain and with
  the EM-INF and adaptive-temperature logits processors, interleaved run by run with the order rotated every repeat
  (HF generate showed run-order effects up to 1.6x when variants ran one after another).

``--tiny`` runs the same code on CPU with a 2-layer model of the same family and small shapes, in well under a minute
(a test runs it); its figures are a smoke test, not a measurement.

On a GPU machine, ``bash benchmarks/run_gpu.sh`` installs the missing wheels, runs the CUDA tests and this script in
one command (see the GPU section of docs/benchmarks.md).

    python benchmarks/bench_gpu.py [--tiny] [--out PATH] [--completions 16] [--tokens 128] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, median, print_table  # noqa: E402
from _interleave import _Baton, train_in_turn  # noqa: E402

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
GPU_DEFAULTS = dict(
    batch=4, seq=4096, op_repeats=10, completions=16, tokens=128, steps=3, warmup=1, emft_batch=8, decode_batch=16
)
TINY_DEFAULTS = dict(
    batch=2, seq=64, op_repeats=3, completions=4, tokens=8, steps=2, warmup=1, emft_batch=4, decode_batch=4
)
COMPARED_OPS = (
    "token_entropy",
    "trl_entropy_from_logits",
    "token_entropy_chunked_2^22",
    "self_certainty",
    "self_certainty_chunked_2^22",
)
_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU: a smoke run of the same code")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/gpu/bench_gpu.json)")
    parser.add_argument("--batch", type=int, help="ops: logits batch (GPU default 4)")
    parser.add_argument("--seq", type=int, help="ops: logits sequence length (GPU default 4096)")
    parser.add_argument("--op-repeats", type=int, help="ops: timed calls per variant (GPU default 10)")
    parser.add_argument("--completions", type=int, help="GRPO/RLOO completions per step (GPU default 16)")
    parser.add_argument("--tokens", type=int, help="completion tokens per sample, everywhere (GPU default 128)")
    parser.add_argument("--steps", type=int, help="measured steps per variant, and decode repeats (GPU default 3)")
    parser.add_argument("--warmup", type=int, help="first steps per variant left out (GPU default 1)")
    parser.add_argument("--emft-batch", type=int, help="EM-FT/SFT prompts per step (GPU default 8)")
    parser.add_argument("--decode-batch", type=int, help="decode: prompts per generate call (GPU default 16)")
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="skip the sections not started after this many seconds (330)"
    )
    parser.add_argument(
        "--sections", nargs="+", default=["ops", "grpo", "rloo", "emft", "decode"], help="sections to run"
    )
    args = parser.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "seq", "op_repeats", "completions", "tokens", "steps", "emft_batch", "decode_batch"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}.")
    if args.completions < 2:
        raise SystemExit(f"--completions must be >= 2 (GRPO's group baseline needs two), got {args.completions}.")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}.")
    unknown = set(args.sections) - {"ops", "grpo", "rloo", "emft", "decode"}
    if unknown:
        raise SystemExit(f"--sections must be among ops, grpo, rloo, emft, decode; got {sorted(unknown)}.")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU, or pass --tiny for the CPU smoke run.")
    if args.out is None:
        args.out = Path("/tmp/bench_gpu_tiny_cpu.json") if args.tiny else RESULTS_DIR / "gpu" / "bench_gpu.json"
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------------


class Device:
    """Synchronisation and peak-memory probes that are no-ops on CPU (where memory is not measured)."""

    def __init__(self, tiny: bool):
        self.torch_device = torch.device("cpu" if tiny else "cuda")
        self.cuda = self.torch_device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> float | None:
        """Reset the peak-memory mark; return the memory allocated now (MiB)."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20

    def extra_mib(self, base: float | None) -> float | None:
        """Peak memory since :meth:`start` minus ``base`` (MiB)."""
        if base is None:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return median(values) if values else None


# ---------------------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------------------


def bench_ops(args, dev: Device, vocab_size: int) -> dict:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax_and_entropy

    from trl_entropy import ops, self_certainty, token_entropy

    shape = (args.batch, args.seq, vocab_size)
    torch.manual_seed(0)
    logits = (torch.randn(shape, device=dev.torch_device) * 3).to(torch.bfloat16)
    index = torch.randint(0, vocab_size, shape[:-1], device=dev.torch_device)

    def backward(fn):
        def run():
            x = logits.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(x).sum(), x)
            return grad

        return run

    def naive(x):
        z = x.float()
        return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)

    variants = {
        "token_entropy": lambda: token_entropy(logits),
        "token_entropy_chunked_2^20": lambda: ops._chunked_token_entropy(logits, 1.0, 1 << 20),
        "token_entropy_chunked_2^22": lambda: ops._chunked_token_entropy(logits, 1.0, 1 << 22),
        "naive_softmax_log_softmax": lambda: naive(logits),
        "trl_entropy_from_logits": lambda: entropy_from_logits(logits),
        "self_certainty": lambda: self_certainty(logits),
        "self_certainty_chunked_2^22": lambda: ops._chunked_self_certainty(logits, 1.0, 1 << 22),
        "token_entropy_fwd_bwd": backward(token_entropy),
        "token_entropy_chunked_2^22_fwd_bwd": backward(lambda x: ops._chunked_token_entropy(x, 1.0, 1 << 22)),
        "trl_selective_log_softmax_and_entropy_fwd_bwd": backward(
            lambda x: selective_log_softmax_and_entropy(x, index)[1]
        ),
    }
    records = {name: {"seconds": [], "extra_mib": []} for name in variants}
    outputs = {}
    for repeat in range(args.op_repeats + 1):  # the first round is the warm-up (Triton compiles there)
        for name, fn in variants.items():
            base = dev.start()
            start = time.perf_counter()
            out = fn()
            dev.sync()
            seconds = time.perf_counter() - start
            extra = dev.extra_mib(base)
            if repeat == 0:
                if name in COMPARED_OPS:
                    outputs[name] = out.float()
            else:
                records[name]["seconds"].append(seconds)
                records[name]["extra_mib"].append(extra)
            del out
        progress(f"ops: round {repeat}/{args.op_repeats}")
    rows = []
    for name, rec in records.items():
        rows.append(
            {
                "op": name,
                "median_ms": 1000 * median(rec["seconds"]),
                "extra_mib": _median_or_none(rec["extra_mib"]),
            }
        )
    by_name = {r["op"]: r for r in rows}

    def max_diff(a, b):
        return (outputs[a] - outputs[b]).abs().max().item()

    checks = {
        "backend": ops.entropy_backend(logits.device, logits.dtype),
        "fwd_time_ratio_vs_trl": by_name["token_entropy"]["median_ms"]
        / by_name["trl_entropy_from_logits"]["median_ms"],
        "fwd_bwd_time_ratio_vs_trl": by_name["token_entropy_fwd_bwd"]["median_ms"]
        / by_name["trl_selective_log_softmax_and_entropy_fwd_bwd"]["median_ms"],
        "fwd_extra_mib": by_name["token_entropy"]["extra_mib"],
        "target_time_ratio_max": 1.3,
        "target_fwd_extra_mib_max": 64,
        "max_abs_diff_vs_trl_nats": max_diff("token_entropy", "trl_entropy_from_logits"),
        "max_abs_diff_vs_chunked_nats": max_diff("token_entropy", "token_entropy_chunked_2^22"),
        "self_certainty_max_abs_diff_vs_chunked": max_diff("self_certainty", "self_certainty_chunked_2^22"),
    }
    # On CPU (the --tiny smoke run) TRL runs its PyTorch fallback, not the kernel: no target to meet there.
    checks["meets_target"] = (
        checks["fwd_time_ratio_vs_trl"] <= 1.3
        and checks["fwd_bwd_time_ratio_vs_trl"] <= 1.3
        and checks["fwd_extra_mib"] <= 64
        if dev.cuda
        else None
    )
    print_table(rows, ["op", "median_ms", "extra_mib"])
    print(json.dumps(checks, indent=1))
    return {"shape": list(shape), "dtype": "bfloat16", "repeats": args.op_repeats, "results": rows, "checks": checks}


# ---------------------------------------------------------------------------------------------------------------------
# Trainers, stepped in turn
# ---------------------------------------------------------------------------------------------------------------------


def build_model(args, dev: Device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**(TINY if args.tiny else QWEN25_05B), pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    with dev.torch_device:
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.float32 if args.tiny else torch.bfloat16)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def make_tokenizer():
    from trl_entropy.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


def prompts_dataset(n: int):
    from datasets import Dataset

    from trl_entropy.testing import tiny_prompts

    return Dataset.from_dict({"prompt": tiny_prompts(n)})


def rule_reward(completions, **kwargs):
    """A trivial verifiable-style reward: does the completion contain a digit."""
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def _train_args(args, dev: Device, output_dir: str, max_steps: int) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=not dev.cuda,
        bf16=dev.cuda,
    )


def quiet(trainer):
    """Drop the callback that prints every log dict: the progress lines are enough, and short logs come back whole."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def run_in_turn(trainers: dict, dev: Device, warmup: int, label: str) -> dict:
    """Train every trainer (same ``max_steps``) in turn, one step each, in threads passing a baton; record each
    step's time and CUDA peak memory above the memory allocated at its start."""

    from transformers import TrainerCallback

    names = list(trainers)
    baton = _Baton(names)
    records = {name: [] for name in names}

    class StepProbe(TrainerCallback):
        def __init__(self, name):
            self.name = name

        def on_step_begin(self, args_, state, control, **kwargs):
            baton.wait(self.name)
            torch.manual_seed(1000 + state.global_step)
            self.base = dev.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            dev.sync()
            seconds = time.perf_counter() - self.t0
            records[self.name].append(
                {"seconds": seconds, "extra_mib": dev.extra_mib(self.base), "peak_mib": dev.peak_mib()}
            )
            progress(f"{label}: {self.name} step {state.global_step} {seconds:.2f} s")
            baton.pass_on()

    for name, trainer in trainers.items():
        trainer.add_callback(StepProbe(name))
    train_in_turn(trainers, baton, label)
    base_name = names[0]
    base = records[base_name][warmup:]
    rows = []
    for name in names:
        kept = records[name][warmup:]
        step_s = median([s["seconds"] for s in kept])
        rows.append(
            {
                "variant": name,
                "median_step_s": step_s,
                "time_ratio": step_s / median([s["seconds"] for s in base]),
                # Step i of every variant sampled the same completions: the per-step ratio cancels drifts.
                "paired_time_ratio": median([s["seconds"] / b["seconds"] for s, b in zip(kept, base)]),
                "step_extra_mib": _median_or_none([s["extra_mib"] for s in kept]),
                "extra_memory_ratio": _ratio(
                    _median_or_none([s["extra_mib"] for s in kept]), _median_or_none([s["extra_mib"] for s in base])
                ),
                "peak_allocated_mib": max((s["peak_mib"] for s in kept if s["peak_mib"] is not None), default=None),
            }
        )
    print_table(rows, ["variant", "median_step_s", "time_ratio", "paired_time_ratio", "step_extra_mib"])
    return {"results": rows, "raw": {n: [round(s["seconds"], 4) for s in records[n]] for n in names}}


def bench_rl(args, dev: Device, model, tokenizer, family: str, tmp: str) -> dict:
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

    plain_config, plain_trainer, entropy_config, entropy_trainer = {
        "grpo": (GRPOConfig, GRPOTrainer, EntropyGRPOConfig, EntropyGRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer),
    }[family]
    dataset = prompts_dataset(64)
    common = dict(
        **_train_args(args, dev, "", args.warmup + args.steps),
        per_device_train_batch_size=args.completions,
        num_generations=args.completions,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0,
        beta=0.0,
    )

    def build(trainer_class, config_class, reward, tag, **extra):
        config = config_class(**{**common, "output_dir": f"{tmp}/{family}_{tag}"}, **extra)
        return quiet(
            trainer_class(copy.deepcopy(model), reward, config, train_dataset=dataset, processing_class=tokenizer)
        )

    trainers = {
        f"{family}_plain": build(plain_trainer, plain_config, rule_reward, "plain"),
        "entropy_reward_token": build(entropy_trainer, entropy_config, None, "token", entropy_reward="token"),
        "entropy_reward_trajectory": build(
            entropy_trainer, entropy_config, None, "trajectory", entropy_reward="trajectory"
        ),
        "forking_0.2": build(entropy_trainer, entropy_config, rule_reward, "fork", forking_token_ratio=0.2),
    }
    if family == "grpo":  # TRL's RLOOTrainer has no entropy mask
        trainers["trl_top_entropy_quantile_0.2"] = build(
            plain_trainer, plain_config, rule_reward, "quantile", top_entropy_quantile=0.2
        )
    progress(f"{family}: {len(trainers)} trainers built")
    result = run_in_turn(trainers, dev, args.warmup, family)
    del trainers
    return {
        "completions_per_step": args.completions,
        "completion_tokens": args.tokens,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        **result,
    }


def bench_emft(args, dev: Device, model, tokenizer, tmp: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_entropy.testing import tiny_prompts
    from trl_entropy.trainers import EMFTConfig, EMFTTrainer

    max_steps = args.warmup + args.steps
    n = args.emft_batch * max_steps
    common = _train_args(args, dev, "", max_steps)
    emft = EMFTTrainer(
        copy.deepcopy(model),
        args=EMFTConfig(
            **{**common, "output_dir": f"{tmp}/emft"},
            per_device_train_batch_size=args.emft_batch,
            max_completion_length=args.tokens,
            generation_kwargs={"min_new_tokens": args.tokens},
        ),
        train_dataset=prompts_dataset(n),
        processing_class=tokenizer,
    )
    # SFT on the same prompt + completion token count (random completion ids: a dense model's cost does not depend on
    # which tokens they are).
    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "completion_mask": []}
    for prompt in tiny_prompts(n):
        prompt_ids = tokenizer(prompt + " =", add_special_tokens=False)["input_ids"]
        completion = torch.randint(2, model.config.vocab_size, (args.tokens,), generator=generator).tolist()
        rows["input_ids"].append(prompt_ids + completion)
        rows["completion_mask"].append([0] * len(prompt_ids) + [1] * len(completion))
    sft = SFTTrainer(
        copy.deepcopy(model),
        args=SFTConfig(**{**common, "output_dir": f"{tmp}/sft"}, per_device_train_batch_size=args.emft_batch),
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
    )
    result = run_in_turn({"sft": quiet(sft), "emft": quiet(emft)}, dev, args.warmup, "emft")
    del emft, sft
    return {"prompts_per_step": args.emft_batch, "completion_tokens": args.tokens, **result}


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------


def bench_decode(args, dev: Device, model, tokenizer) -> dict:
    from transformers import LogitsProcessorList

    from trl_entropy.decoding.processors import AdaptiveTemperatureLogitsProcessor, EMInfLogitsProcessor
    from trl_entropy.testing import tiny_prompts

    tokenizer.padding_side = "left"
    batch = tokenizer(tiny_prompts(args.decode_batch), return_tensors="pt", padding=True).to(dev.torch_device)
    variants = {
        "plain_sampling": [],
        "em_inf": [EMInfLogitsProcessor()],
        "adaptive_temperature": [AdaptiveTemperatureLogitsProcessor()],
    }
    names = list(variants)
    records = {name: [] for name in names}
    model.eval()
    for repeat in range(args.steps + 1):  # round 0 is the warm-up
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate: no variant always goes first
        for name in order:
            torch.manual_seed(repeat)
            dev.sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    logits_processor=LogitsProcessorList(variants[name]),
                )
            dev.sync()
            seconds = time.perf_counter() - start
            new_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
            if repeat > 0:
                records[name].append({"seconds": seconds, "tokens": new_tokens})
        progress(f"decode: round {repeat}/{args.steps}")
    base = records["plain_sampling"]
    rows = []
    for name in names:
        rec = records[name]
        rows.append(
            {
                "variant": name,
                "tokens_per_s": median([r["tokens"] / r["seconds"] for r in rec]),
                "median_call_s": median([r["seconds"] for r in rec]),
                "paired_time_ratio": median([r["seconds"] / b["seconds"] for r, b in zip(rec, base)]),
            }
        )
    print_table(rows, ["variant", "tokens_per_s", "median_call_s", "paired_time_ratio"])
    return {
        "batch": args.decode_batch,
        "new_tokens": args.tokens,
        "repeats": args.steps,
        "results": rows,
        "raw": {n: [round(r["seconds"], 4) for r in records[n]] for n in names},
    }


# ---------------------------------------------------------------------------------------------------------------------


def environment(dev: Device, args) -> dict:
    import transformers
    import trl

    return {
        "device": torch.cuda.get_device_name(0) if dev.cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_type": dev.torch_device.type,
        "tiny_cpu_smoke_run": args.tiny,
        "model": "random Qwen2 in the shape of Qwen2.5-0.5B" if not args.tiny else "random 2-layer Qwen2 (tiny)",
        "vocab_size": (TINY if args.tiny else QWEN25_05B)["vocab_size"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    args = parse_args(argv)
    dev = Device(args.tiny)
    payload = {"settings": environment(dev, args)}
    progress(f"device: {payload['settings']['device']}")
    vocab_size = (TINY if args.tiny else QWEN25_05B)["vocab_size"]
    skipped = []

    def run_section(name: str, fn) -> None:
        if name not in args.sections:
            return
        if time.perf_counter() - _START > args.budget_s:
            skipped.append(name)  # recorded, never estimated
            progress(f"{name} skipped: the {args.budget_s} s budget is spent")
            return
        try:
            payload[name] = fn()
            progress(f"{name} done")
        except Exception as err:  # one failing section must not cost the others: a GPU call is scarce
            payload[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            progress(f"{name} FAILED: {type(err).__name__}: {err}")
        gc.collect()
        if dev.cuda:
            torch.cuda.empty_cache()
        write_json(args.out, payload)  # after every section: a run cut short keeps what it measured

    run_section("ops", lambda: bench_ops(args, dev, vocab_size))
    if set(args.sections) - {"ops"}:
        model, tokenizer = build_model(args, dev), make_tokenizer()
        progress(f"model built: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        with tempfile.TemporaryDirectory() as tmp:
            run_section("grpo", lambda: bench_rl(args, dev, model, tokenizer, "grpo", tmp))
            run_section("rloo", lambda: bench_rl(args, dev, model, tokenizer, "rloo", tmp))
            run_section("emft", lambda: bench_emft(args, dev, model, tokenizer, tmp))
        run_section("decode", lambda: bench_decode(args, dev, model, tokenizer))
    payload["settings"]["skipped_sections"] = skipped
    payload["settings"]["wall_s"] = round(time.perf_counter() - _START, 1)
    write_json(args.out, payload)
    progress(f"wrote {args.out}")
    return payload


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp_path, path)


def _finite(value):
    """``value`` with NaN and infinite floats replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
