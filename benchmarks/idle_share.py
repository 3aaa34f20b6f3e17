"""How much a balanced run's devices idle at epoch ends with static shards: the noise `work_sharing="auto"` must
not take for a straggler, next to the idle share one device 2x slower causes.

    python -m benchmarks.idle_share [--out benchmarks/results/idle_share.json] [--seeds 3] [--epochs 6]

Each run is the MNIST-1D recipe with ``work_sharing="static"`` and a CSV logger; ``fedhog/idle_share`` is read for
every epoch end (with the straggler it is acted on, so logged once). The slow rank sleeps as long as one process's
step takes alone: P8's calibration, read from its committed JSON (``settings.slow_seconds``), so both benchmarks
slow the same rank by the same amount.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

P8_RESULTS = Path(__file__).resolve().parent / "results" / "p8_straggler_accuracy.json"


def p8_step_seconds() -> float:
    """P8's calibrated step time (one process alone), rounded to 0.1 ms as the committed idle-share runs used it."""
    return round(float(json.loads(P8_RESULTS.read_text())["settings"]["slow_seconds"]), 4)


SETTINGS = {
    "2x2": [],  # the recipe's 2 devices x 2 workers: 4 processes on 2 cores
    "2x1": ["--trainer.strategy.workers_per_device=1"],
    "2x1_straggler": [
        "--trainer.strategy.workers_per_device=1", "--trainer.callbacks+=benchmarks.straggler.Straggler",
        "--trainer.callbacks.slow_ranks=[1]", f"--trainer.callbacks.seconds={p8_step_seconds()}",
    ],
}


def idle_shares(setting: list[str], seed: int, epochs: int, data: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="idle-share-"))
    command = [
        sys.executable, "-m", "recipes.mnist1d", "fit", f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={out}",
        f"--trainer.default_root_dir={out}", "--trainer.strategy.work_sharing=static", f"--data.data_dir={data}",
        f"--seed_everything={seed}", *setting,
    ]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{proc.stderr[-4000:]}")
    with next(out.glob("**/metrics.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    shares = [round(float(row["fedhog/idle_share"]), 3) for row in rows if row.get("fedhog/idle_share")]
    return {"seed": seed, "idle_share": shares, "wall_s": round(time.perf_counter() - began, 1),
            "command": shlex.join(command)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/idle_share.json"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="mnist1d-"))
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for seed in range(args.seeds):  # interleaved: the machine's drift reaches every setting alike
        for name, setting in SETTINGS.items():
            runs[name].append(idle_shares(setting, seed, args.epochs, data))
            print(name, runs[name][-1]["idle_share"], flush=True)
    summary = {name: {"max": max(s for run in r for s in run["idle_share"]),
                      "all": [s for run in r for s in run["idle_share"]]} for name, r in runs.items()}
    report = {"command": shlex.join([sys.executable, "-m", "benchmarks.idle_share", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "summary": summary, "runs": runs}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
