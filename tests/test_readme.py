"""The README's Python example works when pasted into a file and run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_readme_example_trains(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "train.py"
    script.write_text(blocks[0])
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in proc.stdout + proc.stderr


def test_readme_commands_exist_in_the_makefile() -> None:
    makefile = (README.parent / "Makefile").read_text()
    assert "make demo" in README.read_text() and "\ndemo:" in makefile
    assert "make test" in README.read_text() and "\ntest:" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()
