"""How one ``fit`` shares its training batches: static shards, dynamic sharing, and the switch between them.

``work_sharing="static"`` keeps Lightning's equal shards and watches the devices' training times for stragglers
(:class:`~lightning_fedhog.stragglers.StragglerWatch`, one warning); ``"dynamic"`` hands out every batch from a
counter the run shares (:class:`~lightning_fedhog.work_sharing.DynamicWork`); ``"auto"`` starts static and switches
to dynamic sharing at the epoch end where the watch measured idle devices, on every worker at once. A checkpoint
records how work was shared, and a resumed run (or a second ``fit`` of the same Trainer, whose workers' step counts
already differ) goes on sharing dynamically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning_fedhog.checks import loader_blocker, settings_blocking_dynamic_sharing
from lightning_fedhog.config import WorkSharing
from lightning_fedhog.stragglers import StragglerWatch
from lightning_fedhog.telemetry import log_as_lightning_does
from lightning_fedhog.work_sharing import RESCUE_KEY, SHARING_KEY, DynamicWork

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


class WorkPlan:
    """The work sharing of one ``fit``, created when the strategy sets up its environment and dropped at teardown.

    Args:
        mode: the ``work_sharing`` knob.
        world_size: workers in the run.
        rank: this worker's global rank.
        report: whether this worker logs and warns for the run (global rank 0).
        carried: the dynamic-sharing budget the Trainer's previous ``fit`` left (None: it shared statically).
        watch: builds the straggler watch of static shards, given the switch to call (None: warn only).
    """

    def __init__(
        self,
        mode: WorkSharing,
        *,
        world_size: int,
        rank: int,
        report: bool,
        carried: dict[str, Any] | None,
        watch: Callable[[Callable[[], str | None] | None], StragglerWatch],
    ) -> None:
        self.mode = mode
        self._world_size = world_size
        self._rank = rank
        self._report = report
        self._carried = carried
        self._watch = watch
        self.work: DynamicWork | None = None  # under dynamic sharing
        self.stragglers: StragglerWatch | None = None  # under static shards
        self._reload_setting: int | None = None  # the user's `reload_dataloaders_every_n_epochs` while switching

    def begin(self, trainer: pl.Trainer) -> None:
        """Before the user's ``setup`` hook, which may already read ``trainer.estimated_stepping_batches``."""
        carried = self.mode == "auto" and self._carried is not None  # the last fit switched: steps differ by rank
        if carried and (blocker := settings_blocking_dynamic_sharing(trainer)) is not None:
            raise ValueError(
                f"fedhog: this Trainer's previous `fit` switched to dynamic work sharing (`work_sharing='auto'`), so"
                f" its workers' step counts differ and this `fit` must share work dynamically too, but {blocker}"
            )
        if self.mode == "dynamic" or carried:
            self._share_dynamically(trainer, attach=True)
        else:
            self.stragglers = self._watch((lambda: self._switch(trainer)) if self.mode == "auto" else None)

    def _share_dynamically(self, trainer: pl.Trainer, attach: bool) -> None:
        self.work = DynamicWork(self._world_size, self._rank, carried=self._carried)
        if attach:
            self.work.attach(trainer)
        self.stragglers = None

    def _switch(self, trainer: pl.Trainer) -> str | None:
        """``"auto"`` measured idle devices: dynamic sharing from the next epoch on (the loader is set up again
        then). Called at the same epoch-end meeting on every rank, which all decide alike from the same figures.

        Returns:
            None when it switched, else why the run's settings rule dynamic sharing out.
        """
        blocker = settings_blocking_dynamic_sharing(trainer) or loader_blocker(trainer)
        if blocker is not None:
            return blocker
        self._share_dynamically(trainer, attach=False)  # the estimate stays Lightning's until the new loader exists
        self._reload_setting = trainer.reload_dataloaders_every_n_epochs  # given back once the loader is new
        return None

    def epoch_over(self, trainer: pl.Trainer) -> None:
        """After the epoch's validation: a switch decided in this epoch sets the training loader up again at the next
        epoch's start (only then, or the validation loader would be set up again as well)."""
        if self._reload_setting is not None:
            trainer.reload_dataloaders_every_n_epochs = 1

    def set_up(self, trainer: pl.Trainer, schedulers: list[Any]) -> None:
        """In the strategy's ``setup``, once the optimizers exist: per-step LR schedules follow the run's progress."""
        if self.work is not None:
            self.work.pace(trainer, schedulers)

    def training_starts(self, trainer: pl.Trainer) -> None:
        if self.work is not None:
            self.work.on_train_start(trainer)
        self.log(trainer)

    def batch_starts(self) -> None:
        if self.work is not None:
            self.work.on_train_batch()

    def loader(self, dataloader: object, trainer: pl.Trainer, store: Any, key: str, schedulers: list[Any]) -> object:
        """Under dynamic sharing, the training loader with a sampler fed by the run's shared counter."""
        if self.work is None or not trainer.training:
            return dataloader
        loader = self.work.loader(dataloader, trainer, store, key)
        if self._reload_setting is not None:  # the first loader after `"auto"` switched
            trainer.reload_dataloaders_every_n_epochs, self._reload_setting = self._reload_setting, None
            self.work.attach(trainer)
            self.work.pace(trainer, schedulers)
            self.log(trainer)
        return loader

    def log(self, trainer: pl.Trainer) -> None:
        """``fedhog/work_sharing`` through the Trainer's loggers: 1 once batches are shared dynamically, else 0."""
        if self._report and self.mode == "auto":
            log_as_lightning_does(trainer, {"fedhog/work_sharing": float(self.work is not None)})

    def checkpoint_state(self) -> dict[str, Any]:
        """How work is shared (``"auto"`` resumes into it) and, under dynamic sharing, what the run's ``max_steps``
        budget has spent (the same on every rank)."""
        if self.work is None:
            return {SHARING_KEY: "static"}
        return {SHARING_KEY: "dynamic", **self.work.checkpoint_state()}

    def rescue_state(self, record: dict[str, Any]) -> dict[str, Any]:
        """What a rescue adds to its checkpoint: how work was shared, the budget, and ``record`` under
        ``RESCUE_KEY`` with (dynamic sharing) what of the interrupted epoch was trained."""
        if self.work is None:
            return {SHARING_KEY: "static", RESCUE_KEY: record}
        state, trained = self.work.rescue_state()
        return {SHARING_KEY: "dynamic", **state, RESCUE_KEY: {**record, "trained": trained}}

    def resume_from(self, checkpoint: Mapping[str, Any], trainer: pl.Trainer) -> None:
        """Before the strategy's ``setup``: a checkpoint saved under dynamic sharing resumes into it with ``"auto"``."""
        if self.mode == "auto" and self.work is None and checkpoint.get(SHARING_KEY) == "dynamic":
            blocker = settings_blocking_dynamic_sharing(trainer)
            if blocker is None:
                self._share_dynamically(trainer, attach=True)
            elif self._report:  # every rank resumes from the same step, so static shards are safe
                log.warning(  # through logging: advice that a `warnings` filter should not swallow
                    "fedhog: the checkpoint was saved while work was shared dynamically (`work_sharing='auto'`"
                    " switched), but this run's settings rule that out, so it resumes with static shards: %s", blocker
                )
        if self.work is not None:
            self.work.resume_from(checkpoint, trainer)

    def end(self, trainer: pl.Trainer | None, schedulers: list[Any]) -> dict[str, Any] | None:
        """Gives back what this ``fit`` changed on the Trainer.

        Returns:
            The budget the next ``fit`` of this Trainer carries on (None: nothing was shared dynamically).
        """
        carried = self._carried
        if trainer is not None:
            if self.work is not None:
                carried = self.work.carried_budget() or carried
                self.work.detach(trainer, schedulers)
            if self._reload_setting is not None:  # "auto" switched after the last epoch's loader was set up
                trainer.reload_dataloaders_every_n_epochs, self._reload_setting = self._reload_setting, None
        return carried
