"""Run many ``fanlens`` command lines, each in its own process forked from one that has already
imported ``fanlens.cli`` (a fresh interpreter spends seconds importing torch and timm before
the first line of a case runs).

Usage: ``python cli_forkserver.py JOBS < cases.json > codes.json``; ``cases.json`` is a list of
``{"argv": [...], "stdout": FILE, "stderr": FILE}``; the answer lists the exit codes in the same
order. At most ``JOBS`` cases run at a time. A child runs ``fanlens.cli.main(argv)`` with its
stdout and stderr in the files and exits as ``python -m fanlens.cli ARGV`` would: ``sys.exit``'s
code, or 1 with the traceback for an uncaught exception, after what an interpreter does first at
exit: it waits for the threads that are not daemons (a thread left running hangs the case, as it
would hang the command) and runs the ``atexit`` functions (``weakref.finalize`` and temporary
folders included). It then leaves with ``os._exit``: tearing down the modules of a process that
holds torch costs ~1.5 s per case and is not behaviour of fanlens.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import traceback


def _code(value) -> int:
    """The exit status ``sys.exit(value)`` gives (its message, if any, goes to stderr)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _child(case: dict) -> None:
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    sys.argv = ["fanlens", *case["argv"]]
    code = 1
    try:
        from fanlens import cli

        code = _code(cli.main(case["argv"]))
    except SystemExit as stop:
        code = _code(stop.code)
    except BaseException:
        traceback.print_exc()
    threading._shutdown()  # what the interpreter does first at exit: wait for non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
                _child(case)  # never returns: os._exit ends the child
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    json.dump(codes, sys.stdout)


if __name__ == "__main__":
    main()
