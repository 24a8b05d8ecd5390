"""Run many ``trl-entropy`` command lines, each in its own process, for the bad-input tests.

The parent imports the CLI and its heavy dependencies (torch, transformers, TRL, datasets) once, then forks one child
per command line: the child's stdout and stderr are files of its own (file descriptors 1 and 2, so that anything a
library prints there is caught too), it runs ``trl_entropy.cli.main`` exactly as the console script does (an
uncaught exception prints its traceback to stderr and exits 1, as the interpreter would), and the parent reports
``{"argv", "status", "stdout", "stderr"}`` per case as JSON lines after ``RESULT``. One interpreter start instead of
one per case: each start costs 3-10 s of CPU.

Usage: ``python cli_cases.py cases.json`` with a JSON list of argument lists.
"""

import json
import os
import sys
import tempfile
import traceback

import torch  # noqa: F401  (imported before forking: every child finds it loaded)
import transformers  # noqa: F401
import trl  # noqa: F401

from trl_entropy.cli import main


def run_case(argv: list[str], folder: str) -> dict:
    out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
    pid = os.fork()
    if pid == 0:  # the child: its own stdout/stderr files, main() as the console script runs it
        for fd, path in ((1, out_path), (2, err_path)):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        try:
            status = main(argv)
        except SystemExit as exit_info:
            status = exit_info.code if isinstance(exit_info.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    _, wait_status = os.waitpid(pid, 0)
    with (
        open(out_path, encoding="utf-8", errors="replace") as out,
        open(err_path, encoding="utf-8", errors="replace") as err,
    ):
        return {
            "argv": argv,
            "status": os.waitstatus_to_exitcode(wait_status),
            "stdout": out.read(),
            "stderr": err.read(),
        }


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        cases = json.load(handle)
    results = []
    for argv in cases:
        with tempfile.TemporaryDirectory() as folder:
            results.append(run_case(argv, folder))
    print("RESULT")
    for result in results:
        print(json.dumps(result))
