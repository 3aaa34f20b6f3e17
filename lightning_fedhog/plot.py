"""``python -m lightning_fedhog.plot LOGDIR [LOGDIR ...] --out DIR``: PNG charts of CSV-logged runs.

Reads every ``metrics.csv`` (Lightning's ``CSVLogger``) under each LOGDIR and writes:

- ``fedhog.png``: the ``fedhog/...`` figures (averaging rate, traffic, consensus distance, staleness,
  throughput, parked time) against the training step, one line per run;
- ``progress.png``: every logged loss and accuracy against wall-clock seconds (``fedhog/wall_time_s``, or
  ``wall_time_s`` from :class:`~lightning_fedhog.WallClock` for other strategies such as DDP), so runs of
  different strategies compare on one chart; against the epoch where a run has no wall-clock.

Needs matplotlib (``pip install lightning-fedhog[plot]``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

FEDHOG_PANELS = (
    "fedhog/rounds_per_s", "fedhog/bytes_per_s", "fedhog/consensus_distance", "fedhog/round_distance",
    "fedhog/staleness_steps", "fedhog/samples_per_s", "fedhog/parked_s", "fedhog/seconds_per_round",
)
WALL_KEYS = ("fedhog/wall_time_s", "wall_time_s")


def read_runs(logdirs: list[Path]) -> dict[str, list[dict[str, float]]]:
    """``{run label: rows}``; a row maps each column that has a value to a float."""
    runs: dict[str, list[dict[str, float]]] = {}
    for logdir in logdirs:
        paths = sorted(logdir.rglob("metrics.csv")) if logdir.is_dir() else [logdir]
        if not paths:
            raise FileNotFoundError(f"no metrics.csv under {logdir}. HINT: log with `CSVLogger` (the default without"
                                    " tensorboard) or point at the folder that holds `metrics.csv`.")
        for path in paths:
            label = logdir.name if len(paths) == 1 else f"{logdir.name}/{path.parent.name}"
            with path.open() as handle:
                rows = list(csv.DictReader(handle))
            runs[label] = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]
    return runs


def _xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [x for x, _ in points], [y for _, y in points]


def _wall_clock(rows: list[dict[str, float]]) -> dict[float, float]:
    """step -> wall seconds, from whichever wall-clock column the run logged."""
    clock: dict[float, float] = {}
    for row in rows:
        for key in WALL_KEYS:
            if key in row and "step" in row:
                clock[row["step"]] = row[key]
    return clock


def plot(runs: dict[str, list[dict[str, float]]], out: Path) -> list[Path]:
    import matplotlib
    import numpy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [key for key in FEDHOG_PANELS if any(key in row for rows in runs.values() for row in rows)]
    if panels:
        columns = 2
        figure, axes = plt.subplots((len(panels) + 1) // columns, columns, figsize=(11, 2.6 * ((len(panels) + 1) // 2)))
        for axis, key in zip(figure.axes, panels, strict=False):
            for label, rows in runs.items():
                points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
                if points:
                    axis.plot(*_xy(points), marker="o", markersize=3, label=label)
            axis.set_title(key.removeprefix("fedhog/"))
            axis.set_xlabel("step")
        figure.axes[0].legend(fontsize=8)
        figure.tight_layout()
        written.append(out / "fedhog.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)

    curves = sorted({k for rows in runs.values() for row in rows for k in row if "loss" in k or "acc" in k})
    if curves:
        figure, axes = plt.subplots(len(curves), 1, figsize=(8, 2.8 * len(curves)), squeeze=False)
        for axis, key in zip(axes[:, 0], curves, strict=True):
            for label, rows in runs.items():
                clock = _wall_clock(rows)
                if clock:  # wall-clock readings come once per epoch: interpolate between them by step
                    steps, seconds = [0.0, *sorted(clock)], [0.0, *(clock[s] for s in sorted(clock))]
                    points = [
                        (float(numpy.interp(row["step"], steps, seconds)), row[key])
                        for row in rows
                        if key in row and "step" in row
                    ]
                else:
                    points = [(row.get("epoch", 0.0), row[key]) for row in rows if key in row]
                if points:
                    axis.plot(*_xy(points), marker=".", label=f"{label} ({'s' if clock else 'epoch'})")
            axis.set_title(key)
            axis.set_xlabel("wall-clock seconds (epoch where a run has no clock)")
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
        figure.tight_layout()
        written.append(out / "progress.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_fedhog.plot", description=__doc__.split("\n")[0])
    parser.add_argument("logdirs", type=Path, nargs="+", help="CSVLogger folders (or metrics.csv files), one per run")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="where the PNGs go")
    args = parser.parse_args(argv)
    for path in plot(read_runs(args.logdirs), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
