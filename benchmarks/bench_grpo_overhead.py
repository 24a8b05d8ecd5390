"""Step-time and memory overhead of EntropyGRPOTrainer against plain GRPOTrainer on the default model (CPU).

Variants, interleaved step by step in one run (see _interleave.py), with the same generation settings:
    grpo                 GRPOTrainer with a trivial rule reward (the baseline);
    em_token             EntropyGRPOTrainer, entropy_reward="token", captured during generation (no extra forward);
    forking_0.2          EntropyGRPOTrainer with the rule reward and forking_token_ratio=0.2;
    naive_extra_forward  GRPOTrainer whose reward function runs one extra forward pass for the token entropy.
Targets: em_token and forking_0.2 time ratio <= 1.02 and memory ratio <= 1.05.

    python benchmarks/bench_grpo_overhead.py [--steps 8] [--warmup 2] [--completions 8] [--tokens 32]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _overhead import parse_args, run_overhead  # noqa: E402

if __name__ == "__main__":
    run_overhead("bench_grpo_overhead", "grpo", parse_args(__doc__))
