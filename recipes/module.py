"""The image-classification LightningModule of the recipes: SGD with Nesterov momentum, linear warm-up then
cosine decay (the schedule of the paper's experiments), top-1/top-5 accuracy from torchmetrics."""

from __future__ import annotations

import math

import lightning as L
import torch
import torchmetrics
from torch import nn

from recipes.models import build_model


class ImageClassifier(L.LightningModule):
    """Trains ``model`` with cross-entropy; nothing in it knows about fedhog.

    Args:
        model: ``resnet20``, ``wrn16_8``, ``resnet18`` or ``resnet50``.
        num_classes: output classes (10, 100, 1000).
        lr: peak learning rate, reached after the warm-up (the paper scales it with the number of workers).
        warmup_start_lr: learning rate of the first step.
        warmup_epochs: linear warm-up length in epochs (the paper: 5).
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 penalty.
        label_smoothing: cross-entropy label smoothing (0: off).
    """

    def __init__(
        self,
        model: str = "resnet20",
        num_classes: int = 10,
        lr: float = 0.4,
        warmup_start_lr: float = 0.1,
        warmup_epochs: int = 5,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(model, num_classes)
        metrics = {"top1": 1, "top5": min(5, num_classes)}
        self.val_metrics = torchmetrics.MetricCollection(
            {
                name: torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for name, k in metrics.items()
            },
            prefix="val_",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_metrics(logits, y)
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum, nesterov=True,
            weight_decay=self.hparams.weight_decay,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = min(total, total * self.hparams.warmup_epochs // epochs)
        start = self.hparams.warmup_start_lr / self.hparams.lr

        def factor(step: int) -> float:
            if step < warmup:
                return start + (1 - start) * step / max(warmup, 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
