"""P12: LPP-SGD (partial backprop) against LAP-SGD and DDP on MNIST-1D: final accuracy, and time to accuracy.

``p12_lpp_accuracy`` trains the recipe (``python -m recipes.mnist1d fit``, 100 epochs) with its 2 x 2 workers, with
the ``"fedhog_lpp"`` preset (full steps for the first tenth of the epochs, the paper's schedule; 2 workers per CPU
device) and with the same at the paper's 4 workers per device; ``p12_lpp_time`` takes the
wider CNN of P7 (128 channels: convolutions dominate, so a partial step skips real backward work) to a test accuracy
with DDP, and with LAP-SGD and LPP-SGD at 2 and at 4 workers per device, and measures once what a partial step saves
per worker on that model (forward and backward of one batch, one thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy import mnist1d
from benchmarks.catalog import Method, Scale
from lightning_fedhog.partial import first_partial_epoch

K4 = "--trainer.strategy.workers_per_device=4"
LPP = "--trainer.strategy=fedhog_lpp"
SHARE = 0.1  # the preset's share of the epochs with full steps only
PARTIAL = f"--trainer.strategy.partial_backprop={SHARE}"
WIDE_CHANNELS = 128
TIME_TARGET = 0.85
TIME_EPOCHS = 20


def p12_lpp_accuracy(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P12a: the recipe's final test accuracy with LPP-SGD at 2 and 4 workers per device, against 2 x 2 LAP-SGD."""
    data = workdir / "mnist1d-data"
    methods: dict[str, Method] = {
        "fedhog": mnist1d([], 4, scale, data),  # the recipe's default: 2 devices x 2 workers
        # 4 ranks started together: `workers_per_device="auto"` takes 2 per device, what it chooses on CPU here
        "fedhog_lpp": mnist1d([LPP], 4, scale, data),
        "fedhog_lpp_k4": mnist1d([K4, PARTIAL], 8, scale, data),
    }
    return {"methods": methods, "baseline": "fedhog",
            "settings": {"target_accuracy": 0.90, "epochs": scale.mnist_epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "recipe": "python -m recipes.mnist1d fit (Adam, lr 0.01)",
                         "fedhog": "2 devices x 2 workers (the recipe's default)",
                         "fedhog_lpp": "strategy='fedhog_lpp': 2 devices x 2 workers (workers_per_device='auto' with"
                         " partial steps on CPU), full steps for the first 10% of the epochs, then full and partial"
                         " steps alternate",
                         "fedhog_lpp_k4": "the same with the paper's 4 workers per device",
                         "seeds": "repeat i uses seed_everything=i"}}


def p12_lpp_time(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P12b: wall-clock to a test accuracy on a model whose backward pass dominates: DDP, LAP-SGD, LPP-SGD."""
    data = workdir / "mnist1d-data"
    wide = [f"--model.channels={WIDE_CHANNELS}"]
    epochs = TIME_EPOCHS if scale.name != "smoke" else scale.mnist_epochs
    methods: dict[str, Method] = {
        "ddp": mnist1d([*wide, "--trainer.strategy=ddp"], 2, scale, data, epochs, target=TIME_TARGET),
        "fedhog": mnist1d(wide, 4, scale, data, epochs, target=TIME_TARGET),
        "fedhog_lpp_k2": mnist1d([*wide, PARTIAL], 4, scale, data, epochs, target=TIME_TARGET),
        "fedhog_k4": mnist1d([*wide, K4], 8, scale, data, epochs, target=TIME_TARGET),
        "fedhog_lpp": mnist1d([*wide, K4, PARTIAL], 8, scale, data, epochs, target=TIME_TARGET),
    }
    return {"methods": methods, "baseline": "ddp",
            "baselines": {"fedhog_lpp_k2": "fedhog", "fedhog_lpp": "fedhog_k4"},  # partial steps against full ones
            "once": {"partial_step": lambda: partial_step_saving(WIDE_CHANNELS),
                     "partial_step_k2": lambda: partial_step_saving(WIDE_CHANNELS, workers=2)},
            "settings": {"target_accuracy": TIME_TARGET, "epochs": epochs, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "model": f"ConvNet1D, channels={WIDE_CHANNELS} (105,738"
                         " parameters)", "recipe": f"python -m recipes.mnist1d fit --model.channels={WIDE_CHANNELS}",
                         "ddp": "2 processes", "fedhog": "2 devices x 2 workers, full steps (LAP-SGD, the defaults)",
                         "fedhog_lpp_k2": f"the same with partial_backprop={SHARE} (2 blocks)",
                         "fedhog_k4": "2 devices x 4 workers, full steps (LAP-SGD)",
                         "fedhog_lpp": f"2 x 4 workers, partial_backprop={SHARE} (partial steps alternate from epoch"
                         f" {first_partial_epoch(SHARE, epochs)})", "seeds": "repeat i uses seed_everything=i",
                         "partial_step": "forward+backward of one batch of 32 on one thread, median of 30, per"
                         " worker's block of the numel partition (K=4), over a full step's"}}


def partial_step_saving(channels: int, workers: int = 4, batch: int = 32, repeats: int = 30) -> dict[str, Any]:
    """A partial step's forward+backward time over a full step's, per worker's block, on the recipe's CNN."""
    from benchmarks.partial_backprop import timed
    from lightning_fedhog.partitions import partition_tensors, tensor_costs
    from recipes.mnist1d import ConvNet1D

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = ConvNet1D(channels=channels).net
        x, y = torch.randn(batch, 40), torch.randint(0, 10, (batch,))
        timed(model, x, y, None, 3)  # warm-up
        full = timed(model, x, y, None, repeats)
        numels = [p.numel() for p in model.parameters()]
        blocks = partition_tensors(tensor_costs(numels, [1] * len(numels), "numel"), workers)
        ratios = [timed(model, x, y, block, repeats) / full for block in blocks]
    finally:
        torch.set_num_threads(threads)
    return {"full_step_s": full, "partial_over_full": ratios,
            "mean_step_over_full": (1 + sum(ratios) / len(ratios)) / 2,  # full and partial steps alternate
            "blocks": [[block.start, block.stop] for block in blocks]}
