"""Every code block in docs/ runs: python blocks as scripts, bash blocks as shell commands, sbatch scripts
through ``bash -n`` (there is no SLURM here; the syntax is still checked). ``text`` blocks are diagrams.

Python blocks that train with several processes run as the ranks torchrun would start, forked from the test
session's zygote (``tests/zygote.py``): the same script, without each process's import of Lightning. Lightning's own
launcher (re-running the script per rank) is what the README example, the launching tests and the first recipe run
of observability.md exercise.

Bash blocks run in bash as written. In the blocks of ``BASH_FORKED`` the ``python`` bash finds is a shim: each
``python ...`` command the block runs asks this process what to do with it, in order (see ``BASH_FORKED``), and
the ranks of a forked command are forks of the zygote, given the command's own module and arguments. A torchrun
command (``python -m torch.distributed.run ...``) is parsed by torchrun's own argument parser first, so a flag
torchrun does not know fails the block, and its ``--nproc-per-node`` ranks are forked as torchrun would start
them (real torchrun, its restarts included, is what tests/test_launch.py and tests/test_restart.py run). The
recipes' commands that need a downloaded data set and GPUs are parsed, not trained (``CONFIG``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
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

TORCHRUN, CONFIG = "torchrun", "print_config"
BASH_FORKED: dict[tuple[str, int], list[int | str | None]] = {
    # the fedhog run is a real program start, as `make demo` is: Lightning's launcher re-runs `python -m
    # recipes.mnist1d` for the second rank. The DDP run (2 devices) and the chart (1 process) are forked
    ("observability.md", 0): [None, 2, 1],
    ("launching.md", 0): [TORCHRUN],
    ("launching.md", 3): [TORCHRUN],
    ("recipes.md", 0): [CONFIG, CONFIG, CONFIG],  # CIFAR-10 to download, hours on GPUs: parsed, not trained
}
"""Bash blocks run with the ``python`` shim: for each ``python`` command of the block, in order, ``None`` (run it
for real), a number of ranks to fork (``python -m MODULE ...``), ``TORCHRUN`` (its ranks from its flags) or
``CONFIG`` (one forked process with ``--print_config`` added: LightningCLI parses the config and every flag,
prints the result and stops before anything is built)."""

SHIM = """\
import json, os, socket, sys
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(os.environ["FEDHOG_DOCS_SHIM"])
    sock.sendall(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode() + b"\\n")
    reply = json.loads(sock.makefile().readline())
if reply.get("exec"):
    os.execv(reply["exec"], [reply["exec"], *sys.argv[1:]])
sys.stdout.write(reply["output"])
sys.exit(reply["status"])
"""
"""The shim's client: ``python -S`` (no site-packages, no imports worth the name) sends its command to
:class:`_Shim` and prints what the forked ranks printed, or becomes the real interpreter."""


class _Shim:
    """Serves the shim's requests of one block: forks what ``plan`` says, in order, and counts the commands."""

    def __init__(self, folder: Path, plan: list[int | str | None]) -> None:
        self.plan, self.seen, self.errors = plan, 0, []
        self.folder = folder
        folder.mkdir()
        (folder / "shim.py").write_text(SHIM)
        python = folder / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{folder / "shim.py"}" "$@"\n')
        python.chmod(0o755)
        self.address = str(Path(tempfile.mkdtemp(prefix="fedhog-docs-")) / "shim")  # AF_UNIX: 107 bytes at most
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.address)
        self._listener.listen()
        self._listener.settimeout(0.1)
        self._open = True
        self._thread = threading.Thread(target=self._serve, name="docs-shim", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._open:
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(None)
                request = json.loads(connection.makefile().readline())
                try:
                    reply = self._answer(request)
                except Exception as error:  # the block fails with the reason, and so does the test
                    self.errors.append(f"{request['argv']}: {error!r}")
                    reply = {"status": 1, "output": f"docs shim: {error!r}\n"}
                connection.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, request: dict) -> dict:
        argv = request["argv"]
        if self.seen >= len(self.plan):
            raise AssertionError(f"more python commands than BASH_FORKED plans ({len(self.plan)})")
        how = self.plan[self.seen]
        self.seen += 1
        if how is None:
            return {"exec": sys.executable}
        if argv[:1] != ["-m"] or len(argv) < 2:
            raise AssertionError(f"a forked command is `python -m MODULE ...`, not `python {' '.join(argv)}`")
        module, args = argv[1], argv[2:]
        if how == CONFIG:
            how, args = 1, [*args, "--print_config"]
        elif how == TORCHRUN:
            from torch.distributed.run import parse_args

            if module != "torch.distributed.run":
                raise AssertionError(f"planned a torchrun command, got `python -m {module}`")
            refusal = io.StringIO()
            try:  # torchrun's own parser: a flag it does not know fails here, as it would for a user
                with contextlib.redirect_stderr(refusal):
                    parsed = parse_args(args)
            except SystemExit:
                raise AssertionError(f"torchrun refuses the command: {refusal.getvalue()}") from None
            if parsed.nnodes not in ("1", "1:1") or not parsed.module or not parsed.nproc_per_node.isdigit():
                raise AssertionError(f"one node, `-m MODULE` and a number of processes per node expected: {args}")
            how, module, args = int(parsed.nproc_per_node), parsed.training_script, parsed.training_script_args
        status, output = forkserver().run(None, args, int(how), request["env"], Path(request["cwd"]), 240,
                                          module=module)
        return {"status": status, "output": output}

    def close(self) -> None:
        self._open = False
        self._thread.join(10)
        self._listener.close()
        shutil.rmtree(Path(self.address).parent, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-1D as the recipe generates it on its first run into ``data/mnist1d`` (about 6 s of CPU), once."""
    from recipes.mnist1d import MNIST1DDataModule

    folder = tmp_path_factory.mktemp("mnist1d")
    MNIST1DDataModule(data_dir=str(folder)).prepare_data()
    return folder


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
    blocks = {(page, index): language for page, index, language, _ in BLOCKS}
    assert all(blocks.get(block) == "python" for block in FORKED), "FORKED names a block that is not python"
    assert all(blocks.get(block) == "bash" for block in BASH_FORKED), "BASH_FORKED names a block that is not bash"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation other than ``-`` and ``_`` dropped."""
    headings = re.findall(r"^#+ (.+)$", BLOCK.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_between_the_pages_resolve() -> None:
    broken = []
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(BLOCK.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


@pytest.fixture
def shim(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Shim | None]:
    page, index = request.node.callspec.params["page"], request.node.callspec.params["index"]
    plan = BASH_FORKED.get((page, index))
    if plan is None:
        yield None
        return
    served = _Shim(tmp_path / "shim", plan)
    yield served
    served.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("page", "index", "language", "code"), BLOCKS, ids=[f"{page}-{index}" for page, index, _, _ in BLOCKS]
)
def test_code_block_runs(request: pytest.FixtureRequest, shim: _Shim | None, tmp_path: Path, page: str, index: int,
                         language: str, code: str) -> None:
    if language == "text":
        pytest.skip("a diagram")
    env = _env()
    if "recipes.mnist1d fit" in code and "--print_config" not in code:  # what a first run leaves for the next
        shutil.copytree(request.getfixturevalue("mnist1d_cache"), tmp_path / "data" / "mnist1d")
    if "recipes/configs/" in code:  # commands run from the repository's root
        (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    if language == "python":
        script = tmp_path / "snippet.py"
        script.write_text(code)
        if (page, index) in FORKED:
            status, output = forkserver().run(script, [], FORKED[page, index], env, tmp_path, 240)
            assert status == 0, f"{page} block {index} failed:\n{output[-5000:]}"
            return
        command, cwd = [sys.executable, str(script)], tmp_path
    elif language == "sbatch":
        command, cwd = ["bash", "-n", "-c", code], tmp_path
    else:  # in a scratch folder: whatever the commands write (data, runs) stays out of the repository
        command, cwd = ["bash", "-c", code], tmp_path
        if shim is not None:
            env = {**env, "PATH": f"{shim.folder}{os.pathsep}{env['PATH']}", "FEDHOG_DOCS_SHIM": shim.address}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{page} block {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if shim is not None:
        assert not shim.errors, shim.errors
        assert shim.seen == len(shim.plan), f"{shim.seen} python commands ran, BASH_FORKED plans {len(shim.plan)}"
