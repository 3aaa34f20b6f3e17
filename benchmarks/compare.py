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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def run(config: list[str], out: Path) -> dict:
    command = [sys.executable, str(HERE / "throughput.py"), "--out", str(out), *config]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return {
        "command": " ".join(command),
        "samples_per_s": sum(rank["samples_per_s"] for rank in ranks),
        "per_rank_samples_per_s": [rank["samples_per_s"] for rank in ranks],
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
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/compare.json"))
    args = parser.parse_args()

    common = ["--accelerator", args.accelerator, "--devices", str(args.devices), "--model", args.model,
              "--batch", str(args.batch), "--samples", str(args.samples), "--epochs", str(args.epochs)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["ddp"] = run([*common, "--strategy", "ddp"], Path(tmp) / "ddp")
        results["fedhog"] = run([*common, "--strategy", "fedhog", "--workers", str(args.workers)], Path(tmp) / "fh")
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
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
