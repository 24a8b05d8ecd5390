"""Step-time and memory overhead of EntropyRLOOTrainer against plain RLOOTrainer on the default model (CPU).

Same variants and protocol as bench_grpo_overhead.py, on RLOO. The entropy reward is read from the old-log-probs pass
RLOO already makes, so the target is a time ratio <= 1.03.

    python benchmarks/bench_rloo_overhead.py [--steps 8] [--warmup 2] [--completions 8] [--tokens 32]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _overhead import parse_args, run_overhead  # noqa: E402

if __name__ == "__main__":
    run_overhead("bench_rloo_overhead", "rloo", parse_args(__doc__))
