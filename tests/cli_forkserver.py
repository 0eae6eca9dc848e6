"""Run many ``fanlens`` command lines, each in its own process forked from one that has already
imported ``fanlens.cli`` (a fresh interpreter spends seconds importing torch and timm before
the first line of a case runs).

Usage: ``python cli_forkserver.py JOBS < cases.json > codes.json``; ``cases.json`` is a list of
``{"argv": [...], "stdout": FILE, "stderr": FILE}``; the answer lists the exit codes in the same
order. At most ``JOBS`` cases run at a time. A child runs ``sys.exit(fanlens.cli.main(argv))``
with its stdout and stderr in the files, as ``python -m fanlens.cli ARGV`` would: an uncaught
exception prints its traceback and exits 1, the interpreter shuts down normally (``atexit``).
"""

from __future__ import annotations

import json
import os
import sys


def _child(case: dict) -> None:
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    sys.argv = ["fanlens", *case["argv"]]
    from fanlens import cli

    sys.exit(cli.main(case["argv"]))


def main() -> None:
    jobs = int(sys.argv[1])
    cases = json.load(sys.stdin)
    from fanlens import cli  # noqa: F401  (what every case imports, once)

    codes: list[int | None] = [None] * len(cases)
    running: dict[int, int] = {}
    todo = list(enumerate(cases))
    while todo or running:
        while todo and len(running) < jobs:
            i, case = todo.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case)  # never returns: sys.exit ends the child
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    json.dump(codes, sys.stdout)


if __name__ == "__main__":
    main()
