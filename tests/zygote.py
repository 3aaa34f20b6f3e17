"""A process that imports torch and Lightning once, then forks every rank of the runs it is asked for.

Importing Lightning is most of what a short run's processes do on a small machine (the README's testing section
has the figure), and a 2-device x 2-worker run pays it four times. The test suite (and the benchmarks' smoke mode)
starts this program once; for each run it forks a *launch* process (its own session, output to a log file) that
forks the ranks with the environment torchrun gives them, so Lightning sees a ``TorchElasticEnvironment`` and starts
nothing itself. Each rank runs the script (or module, as ``python -m`` would) with ``runpy`` as ``__main__``.

What this does not exercise is Lightning's own launcher (re-running the script per rank); the tests of launching
(plain script, torchrun, SLURM), of failures and the docs' shell commands start real processes, and the
benchmarks' measured runs are real program starts.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout (see ``tests/forkserver.py``).
This process never runs torch code, creates no thread and initializes no CUDA, so it can fork any number of times.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback

import lightning  # noqa: F401 - the imports every rank needs: paid once, inherited by every fork
import torchmetrics  # noqa: F401

import lightning_fedhog  # noqa: F401
import recipes.cli  # noqa: F401 - LightningCLI, jsonargparse, torchvision: the recipes' imports

_GRACE = 15.0
"""Seconds the other ranks get to stop on their own after one failed (fedhog's peers notice a failed rank and stop
by themselves); the ranks still running after it are killed."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(request: dict, env: dict[str, str]) -> int:
    """One rank: the script (or ``-m`` module) as ``__main__`` with torchrun's environment. Returns the status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    module, script = request.get("module"), request.get("script")
    sys.argv = [script or module, *request["args"]]
    sys.path[0] = request["cwd"] if module else os.path.dirname(os.path.abspath(script))
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _launch(request: dict) -> int:
    """The launch process: forks the ranks, waits for them, ends the survivors of a failure. Returns the status."""
    nproc, port = request["nproc"], _free_port()
    ranks: dict[int, int] = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            env = {
                **request["env"],
                "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "fedhog-zygote",
            }
            code = 1
            try:
                code = _rank(request, env)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks[pid] = rank
    deadline = time.monotonic() + request["timeout"]
    status = 0
    while ranks:
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                print(f"zygote: ranks {sorted(ranks.values())} still running after {request['timeout']} s: killed",
                      file=sys.stderr, flush=True)
                for other in ranks:
                    os.kill(other, signal.SIGKILL)
                status = status or 124
                deadline = float("inf")
            time.sleep(0.02)
            continue
        rank = ranks.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
            print(f"zygote: rank {rank} ended with status {code}", file=sys.stderr, flush=True)
            deadline = min(deadline, time.monotonic() + _GRACE)
    return status


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed by accident goes to stderr, never into the replies
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()  # a rank's `killpg` stays inside its own run
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                code = _launch(request)
            finally:
                os._exit(code)
        _, wait_status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
