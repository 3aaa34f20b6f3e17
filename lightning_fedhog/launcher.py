"""Lightning's subprocess-script launcher, told to start ``devices * K`` processes and to check the model first.

Each of the K workers of a device is a full Lightning rank, so the stock launcher fits once it is given the
right process count: it re-runs the user's script per local rank, and under torchrun or SLURM it only checks
that the external launcher started ``devices * K`` tasks per node. What it cannot know is the model: we look at
it here, in the launching process, so a model fedhog cannot share fails before anything is spawned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

from lightning_fedhog.config import FedHogConfig
from lightning_fedhog.shared_buffer import flat_layout
from lightning_fedhog.work_sharing import check_dynamic_compatible

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FedHogLauncher(_SubprocessScriptLauncher):
    """Starts ``num_processes = devices * workers_per_device`` ranks per node after validating the model."""

    def __init__(
        self, cluster_environment: ClusterEnvironment, num_processes: int, num_nodes: int, config: FedHogConfig
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._config = config

    @override
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        module = trainer.lightning_module if trainer is not None else None
        if module is not None:
            layout = flat_layout(module)
            self._config.validate_model(layout.num_elements, len(list(module.parameters())))
        if trainer is not None and self._config.work_sharing == "dynamic":
            step_based = [
                f"{type(callback).__name__}(every_n_train_steps={callback._every_n_train_steps})"
                if callback._every_n_train_steps
                else f"{type(callback).__name__}(train_time_interval={callback._train_time_interval})"
                for callback in trainer.checkpoint_callbacks
                if isinstance(callback, ModelCheckpoint)
                and (callback._every_n_train_steps or callback._train_time_interval is not None)
            ]
            check_dynamic_compatible(trainer.val_check_interval, step_based)
        return super().launch(function, *args, trainer=trainer, **kwargs)
