"""The client of ``tests/zygote.py``: start it once, ask it for runs, read their output.

The test suite uses one per session (:func:`tests.conftest.forkserver`), and the benchmarks' smoke run one per run
(:func:`benchmarks.harness.fork_ranks`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # `python -m tests.zygote` runs from here


class ForkServer:
    """One zygote process (for a test session, or a smoke run of the benchmarks); :meth:`run` blocks until the run
    it asked for has ended."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        # a process killed before `close` (a smoke run cut short) leaves this folder: the smoke run's is inside its
        # own output folder, which the test session removes
        self._logs = Path(tempfile.mkdtemp(prefix="fedhog-zygote-", dir=os.environ.get("FEDHOG_ZYGOTE_LOGS")))
        self._runs = 0

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=env, cwd=ROOT,
            )
        return self._proc

    def run(self, script: Path | None, args: list[str], nproc: int, env: dict[str, str], cwd: Path,
            timeout: float, module: str | None = None) -> tuple[int, str]:
        """Runs ``script args`` (or ``python -m module args``) as ``nproc`` ranks of one node.

        Args:
            script: the script to run as ``__main__`` (``None`` with ``module``).
            args: its command-line arguments.
            nproc: the ranks, each with torchrun's environment variables.
            env: the environment of every rank (before those variables).
            cwd: the working directory of the ranks.
            timeout: seconds after which the zygote kills the ranks (status 124).
            module: the module to run as ``python -m`` would, instead of ``script``.

        Returns:
            The run's status (the first failing rank's) and the output of all ranks, stdout and stderr in one.
        """
        proc = self._start()
        self._runs += 1
        log = self._logs / f"run{self._runs}.log"
        request = {"script": str(script) if script else None, "module": module, "args": args, "nproc": nproc,
                   "env": env, "cwd": str(cwd), "timeout": timeout, "log": str(log)}
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout + 30)  # the zygote kills the ranks at `timeout`
        if not ready:
            self.close()
            raise TimeoutError(f"the zygote did not answer within {timeout + 30} s: {log}")
        line = proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the zygote process died")
        output = log.read_text(errors="replace") if log.exists() else ""
        log.unlink(missing_ok=True)
        return json.loads(line)["returncode"], output

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        for leftover in self._logs.glob("*"):
            leftover.unlink()
        self._logs.rmdir()
