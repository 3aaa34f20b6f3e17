"""Every code block in docs/ runs: python blocks as scripts, bash blocks as shell commands, sbatch scripts
through ``bash -n`` (there is no SLURM here; the syntax is still checked). ``text`` blocks are diagrams.

Python blocks that train with several processes run as the ranks torchrun would start, forked from the test
session's zygote (``tests/zygote.py``): the same script, without each process's import of Lightning. Lightning's own
launcher (re-running the script per rank) is what the README example and the launching tests exercise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import forkserver

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", flags=re.S)
BLOCKS = [
    (path.name, index, language, code)
    for path in sorted((ROOT / "docs").glob("*.md"))
    for index, (language, code) in enumerate(BLOCK.findall(path.read_text()))
]


FORKED = {("quickstart.md", 0): 2, ("migrating-from-ddp.md", 0): 4, ("launching.md", 2): 4}
"""Python blocks whose ranks are forked, with their number of processes (devices x workers per device)."""


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
    }


def test_the_docs_have_code_and_only_known_kinds() -> None:
    assert {language for _, _, language, _ in BLOCKS} <= {"python", "bash", "sbatch", "text"}
    assert sum(language == "python" for _, _, language, _ in BLOCKS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("page", "index", "language", "code"), BLOCKS, ids=[f"{page}-{index}" for page, index, _, _ in BLOCKS]
)
def test_code_block_runs(tmp_path: Path, page: str, index: int, language: str, code: str) -> None:
    if language == "text":
        pytest.skip("a diagram")
    if language == "python":
        script = tmp_path / "snippet.py"
        script.write_text(code)
        if (page, index) in FORKED:
            status, output = forkserver().run(script, [], FORKED[page, index], _env(), tmp_path, 240)
            assert status == 0, f"{page} block {index} failed:\n{output[-5000:]}"
            return
        command, cwd = [sys.executable, str(script)], tmp_path
    elif language == "sbatch":
        command, cwd = ["bash", "-n", "-c", code], tmp_path
    else:  # in a scratch folder: whatever the commands write (data, runs) stays out of the repository
        command, cwd = ["bash", "-c", code], tmp_path
    proc = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{page} block {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
