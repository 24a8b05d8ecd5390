"""Start-up time of ``trl-entropy --help`` against ``trl --help``, and of ``trl-entropy grpo --help`` against
``trl grpo --help``: what a user waits for before the first line of help.

Each command runs as the installed console script in a fresh process (stdout discarded), timed by wall clock from
start to exit. The commands are interleaved: every repetition runs each of them once, in an order rotated from one
repetition to the next, so that a change in the machine's load affects every command alike. One untimed round first
fills the file cache (its times are kept as ``first_run_s``). The ratio of a command is its median divided by the
median of its ``trl`` counterpart: 1 is as fast as TRL's own CLI. ``trl-entropy --help`` imports neither torch nor
transformers (the package, the CLI and its top-level parser import them lazily); ``grpo --help`` must build the
parser from the trainer configs, which import TRL's trainers, transformers and torch, as ``trl grpo --help`` does.

    python benchmarks/bench_cli_help.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, write_results  # noqa: E402

BIN = Path(sys.executable).parent
# (label, argv, label of the TRL command it is compared with)
COMMANDS = [
    ("trl --help", [str(BIN / "trl"), "--help"], None),
    ("trl-entropy --help", [str(BIN / "trl-entropy"), "--help"], "trl --help"),
    ("trl grpo --help", [str(BIN / "trl"), "grpo", "--help"], None),
    ("trl-entropy grpo --help", [str(BIN / "trl-entropy"), "grpo", "--help"], "trl grpo --help"),
]


def time_command(argv: list[str]) -> float:
    """Wall-clock seconds of one run of ``argv`` in a fresh process; raises if it fails."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each command (interleaved)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    first_run = {label: time_command(argv) for label, argv, _ in COMMANDS}
    times: dict[str, list[float]] = {label: [] for label, _, _ in COMMANDS}
    for repeat in range(args.repeats):
        shift = repeat % len(COMMANDS)
        for label, argv, _ in COMMANDS[shift:] + COMMANDS[:shift]:
            times[label].append(time_command(argv))

    medians = {label: median(values) for label, values in times.items()}
    rows = []
    for label, _, baseline in COMMANDS:
        rows.append(
            {
                "command": label,
                "median_s": round(medians[label], 3),
                "min_s": round(min(times[label]), 3),
                "max_s": round(max(times[label]), 3),
                "first_run_s": round(first_run[label], 3),
                "vs_trl": round(medians[label] / medians[baseline], 2) if baseline else None,
            }
        )
    ratios = {f"{label} / {baseline}": row["vs_trl"] for (label, _, baseline), row in zip(COMMANDS, rows) if baseline}
    print_table(rows, ["command", "median_s", "min_s", "max_s", "first_run_s", "vs_trl"])
    print()
    write_results(
        "bench_cli_help",
        {
            "results": rows,
            "ratios": ratios,
            "settings": {
                "repeats": args.repeats,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            },
            "runs": {label: [round(t, 4) for t in values] for label, values in times.items()},
        },
    )


if __name__ == "__main__":
    main()
