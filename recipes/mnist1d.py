"""MNIST-1D with a small 1-D CNN, trained with ``strategy="fedhog"``: the project's default job.

MNIST-1D (Greydanus, 2020) is generated offline by the ``mnist1d`` package, so this runs anywhere with no
download. A three-layer 1-D CNN reaches about 94% test accuracy (the published CNN figure).

    python -m recipes.mnist1d fit                        # 2 CPU devices x 2 workers, fedhog
    python -m recipes.mnist1d fit --trainer.strategy=ddp # the same run with DDP
    python -m recipes.mnist1d fit --print_config         # every setting, as YAML
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fedhog  # noqa: F401 - registers strategy="fedhog"


class MNIST1DDataModule(L.LightningDataModule):
    """MNIST-1D, generated once into ``data_dir`` and loaded by every worker.

    Args:
        data_dir: where the generated data set is cached.
        batch_size: per-worker batch size.
        num_samples: samples generated (80% train, 20% test); 5000 is the published data set.
        seed: generator seed (42 reproduces the published data set).
    """

    def __init__(
        self, data_dir: str = "data/mnist1d", batch_size: int = 32, num_samples: int = 5000, seed: int = 42
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.path = Path(data_dir) / f"mnist1d-{num_samples}-{seed}.pkl"

    def prepare_data(self) -> None:
        if self.path.exists():
            return
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = self.hparams.num_samples, self.hparams.seed
        data = make_dataset(args)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps({k: data[k] for k in ("x", "y", "x_test", "y_test")}))
        tmp.replace(self.path)

    def setup(self, stage: str) -> None:
        data = pickle.loads(self.path.read_bytes())
        self.train = TensorDataset(torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"]))
        self.test = TensorDataset(torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=500)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=500)


class ConvNet1D(L.LightningModule):
    """The MNIST-1D reference CNN: three strided 1-D convolutions and a linear classifier.

    Args:
        channels: channels of each convolution.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(self, channels: int = 25, lr: float = 0.01, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 40)),
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * 5, 10),
        )
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ReportAccuracy(L.Callback):
    """Prints the consensus model's accuracy on the MNIST-1D test split once, when ``fit`` ends."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val_acc")
        if trainer.is_global_zero and accuracy is not None:
            print(f"MNIST-1D test accuracy after {trainer.current_epoch} epochs: {float(accuracy):.4f}")


def main() -> None:
    LightningCLI(
        ConvNet1D,
        MNIST1DDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "accelerator": "cpu",
            "devices": 2,
            "strategy": {"class_path": "lightning_fedhog.FedHogStrategy", "init_args": {"workers_per_device": 2}},
            "max_epochs": 100,
            "callbacks": [ReportAccuracy()],
            "default_root_dir": "runs/mnist1d",
        },
    )


if __name__ == "__main__":
    main()
