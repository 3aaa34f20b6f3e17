"""Runs fedhog and DDP in one invocation on this machine and writes their throughput ratio to JSON.

    python benchmarks/compare.py --accelerator cpu --devices 2 --model mlp            # CPU
    python benchmarks/compare.py --accelerator gpu --devices 1 --model cnn --workers 4  # GPU smoke + timing

Every configuration is a separate launch of ``benchmarks/throughput.py``; the aggregate samples/s is the sum
over ranks. The JSON records the exact commands, the machine and the ratios (fedhog / ddp).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def aggregate(ranks: list[dict], skip: int = 3) -> float:
    """Samples/s of all workers together between the moment every worker has warmed up and the last step.

    The window ends with the *last* worker's last step, so time a fast worker spends idle waiting for a
    straggler counts against the method, as it does for the user.
    """
    start = max(rank["times"][min(skip, len(rank["times"]) - 1)] for rank in ranks)
    end = max(rank["times"][-1] for rank in ranks)
    samples = sum(sum(start < t <= end for t in rank["times"]) * rank["batch"] for rank in ranks)
    return samples / max(end - start, 1e-9)


def run(config: list[str], out: Path) -> dict:
    command = [sys.executable, str(HERE / "throughput.py"), "--out", str(out), *config]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return {
        "command": " ".join(command),
        "samples_per_s": aggregate(ranks),
        "steps_per_rank": [len(rank["times"]) for rank in ranks],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="fedhog workers per device")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--slow-factor", type=float, default=1.0, help="make the last rank this many times slower")
    parser.add_argument("--work-sharing", default="dynamic", help="fedhog's work sharing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/compare.json"))
    args = parser.parse_args()

    common = ["--accelerator", args.accelerator, "--devices", str(args.devices), "--model", args.model,
              "--batch", str(args.batch), "--samples", str(args.samples), "--epochs", str(args.epochs)]
    if args.slow_factor != 1.0:
        common += ["--slow-rank", str(args.devices - 1), "--slow-factor", str(args.slow_factor)]
    methods = {
        "ddp": [*common, "--strategy", "ddp"],
        "fedhog": [*common, "--strategy", "fedhog", "--workers", str(args.workers)]
        + ["--work-sharing", args.work_sharing],
    }
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved, so slow drifts of the machine hit both methods
            for name, config in methods.items():
                runs[name].append(run(config, Path(tmp) / f"{name}{repeat}"))
    results = {
        name: {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "all_samples_per_s": [r["samples_per_s"] for r in rs],
            "steps_per_rank": [r["steps_per_rank"] for r in rs],
            "command": rs[0]["command"],
        }
        for name, rs in runs.items()
    }
    report = {
        "invocation": " ".join([sys.executable, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "results": results,
        "ratio_fedhog_over_ddp": results["fedhog"]["samples_per_s"] / results["ddp"]["samples_per_s"],
        "note": "medians over interleaved repeats; samples/s of all workers from warm-up to the last step",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
