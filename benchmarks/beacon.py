"""A callback for P11's runs (:mod:`benchmarks.chaos`): what each worker did when, for the driver that kills workers.

Apart from :mod:`benchmarks.chaos` because the report imports that module and must not import Lightning.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L


class Beacon(L.Callback):
    """What each worker of a P11 run did when, appended to ``folder/beacon-rank{R}.jsonl`` as it happens.

    Events: ``start`` (training starts or resumes: the restored step and epoch, the process id and torchrun's
    attempt), ``batch`` (every training batch's end: the global step), ``val`` (rank 0: each validation's
    accuracy) and ``exception`` (``fit`` failed on this worker).
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._file: Any = None

    def _write(self, trainer: L.Trainer, event: str, **fields: Any) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = (self.folder / f"beacon-rank{trainer.global_rank}.jsonl").open("a", buffering=1)
        self._file.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "start", step=trainer.global_step, epoch=trainer.current_epoch, pid=os.getpid(),
                    attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._write(trainer, "batch", step=trainer.global_step, epoch=trainer.current_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val_acc")
        if trainer.is_global_zero and accuracy is not None and not trainer.sanity_checking:
            self._write(trainer, "val", epoch=trainer.current_epoch, accuracy=float(accuracy))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write(trainer, "exception", kind=type(exception).__name__)
