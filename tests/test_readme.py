"""The README: its Python example works when pasted into a file and run, its two commands exist, it stays short,
and its summary of the benchmarks quotes the tables generated from the committed results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.suite import RESULTS

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+\.\d+x?|\d+x)(?![\w.]*\d)")
"""A figure in a result: a decimal (0.86x, 14.1, 0.946), a number with thousands separators (4,081), or a ratio
(75x). Whole numbers without a unit (3 seeds, 2 x 1, 20 Mbit/s) are settings, not results."""


@pytest.mark.slow
def test_readme_example_trains(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "train.py"
    script.write_text(blocks[0])
    proc = subprocess.run(  # as a user runs it: no PYTHONPATH but this checkout, no other environment
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in proc.stdout + proc.stderr


def test_readme_commands_exist_in_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README's one shell block is the newcomer's two commands"
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_five_minute_read() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"the README has {len(lines)} lines: move details to docs/ and link them"


def _summary_rows() -> list[list[str]]:
    """The cells of the README's table of wins, ties and losses (header excluded)."""
    section = README.read_text().split("## Where fedhog wins, ties and loses", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in section.splitlines() if line.startswith("|")]
    assert rows[0][0] == "scenario" and rows[1][0].startswith("---"), "the table's header"
    return rows[2:]


def test_the_readme_summary_quotes_the_committed_results() -> None:
    tables: dict[str, str] = {}  # "P7": the generated sections of P7 (both links), "P12": P12a and P12b
    for r in report.load(RESULTS):
        label = r["title"].split()[0].rstrip("ab")
        tables[label] = tables.get(label, "") + "\n" + report.section(r)
    rows = _summary_rows()
    assert {row[0].split(":")[0] for row in rows} >= set(tables), "a benchmark missing from the README's summary"
    unquoted = [
        (label, figure)
        for row in rows
        if (label := row[0].split(":")[0]) in tables
        for cell in row[1:]  # the scenario column describes the setting; the others are results
        for figure in FIGURE.findall(cell.replace("**", ""))
        if not re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", tables[label])
    ]
    assert not unquoted, f"figures in the README's summary that the benchmark's generated tables lack: {unquoted}"
