"""token_entropy against the naive softmax/log_softmax formula on [8, 1024, 49152] logits (fp32 and bf16).

Each measurement runs in a fresh subprocess so that the peak RSS it reports belongs to that variant alone; the extra
memory is the peak RSS minus the RSS right after the input logits were allocated. Variants are interleaved over
repeats and the median time is reported.

    python benchmarks/bench_ops.py [--shape 8 1024 49152] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_mib, median, peak_rss_mib, print_table, reset_peak_rss, write_results  # noqa: E402


def naive_entropy(logits):
    import torch

    z = logits.float()
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


def child(variant: str, dtype_name: str, shape: list[int]) -> None:
    import torch

    from trl_entropy import token_entropy

    torch.manual_seed(0)
    logits = (torch.randn(*shape) * 3).to(getattr(torch, dtype_name))
    reset_peak_rss()  # the temporaries of building the input are not the variant's
    base = current_rss_mib()
    fn = token_entropy if variant == "token_entropy" else naive_entropy
    start = time.perf_counter()
    out = fn(logits)
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "extra_mib": peak_rss_mib() - base, "mean": out.mean().item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[8, 1024, 49152])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], args.child[1], args.shape)
        return

    rows, runs = [], {}
    for dtype_name in ("float32", "bfloat16"):
        for _ in range(args.repeats):
            for variant in ("naive", "token_entropy"):  # interleaved
                out = (
                    subprocess.run(
                        [sys.executable, __file__, "--child", variant, dtype_name, "--shape", *map(str, args.shape)]
                        + (["--threads", str(args.threads)] if args.threads else []),
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                runs.setdefault((dtype_name, variant), []).append(json.loads(out))
        naive, ours = runs[(dtype_name, "naive")], runs[(dtype_name, "token_entropy")]
        t_naive, t_ours = median([r["seconds"] for r in naive]), median([r["seconds"] for r in ours])
        m_naive, m_ours = median([r["extra_mib"] for r in naive]), median([r["extra_mib"] for r in ours])
        rows.append(
            {
                "dtype": dtype_name,
                "naive_s": t_naive,
                "token_entropy_s": t_ours,
                "time_ratio": t_ours / t_naive,
                "naive_extra_mib": m_naive,
                "token_entropy_extra_mib": m_ours,
                "memory_ratio": m_ours / max(m_naive, 1e-9),
                "max_abs_mean_diff": abs(naive[0]["mean"] - ours[0]["mean"]),
            }
        )
    print_table(
        rows,
        [
            "dtype",
            "naive_s",
            "token_entropy_s",
            "time_ratio",
            "naive_extra_mib",
            "token_entropy_extra_mib",
            "memory_ratio",
        ],
    )
    write_results(
        "bench_ops", {"shape": args.shape, "repeats": args.repeats, "threads": args.threads, "results": rows}
    )


if __name__ == "__main__":
    main()
