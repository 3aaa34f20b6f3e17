"""``FedHogStrategy``: federated SGD with local asynchrony as a Lightning strategy.

K worker processes per device run lock-free (Hogwild!) SGD on one shared copy of the parameters, and devices
mix their copies in the background by block-wise, in-place averaging (LAP-SGD, Chatterjee, Kungurtsev and
Alistarh, "Federated SGD with local asynchrony", ICDCS 2024). Every worker is a full Lightning rank with its own
loop, data shard and optimizer; this class is the glue between Lightning's hooks and the parts that do the work:
the shared buffer (:mod:`~lightning_fedhog.shared_buffer`), the averaging engine (:mod:`~lightning_fedhog.engine`),
the meetings with the other workers (:mod:`~lightning_fedhog.coordination`: consensus points, the agreed stop,
failures, telemetry), checkpoints, work sharing and partial backprop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lightning_fedhog import internals
from lightning_fedhog.blocks import BlockRule, Partition
from lightning_fedhog.callbacks import ConsensusFirst
from lightning_fedhog.checkpoints import PerWorkerCheckpoints, save_stop_checkpoint
from lightning_fedhog.checks import (
    check_accelerator,
    check_equal_batches,
    checked_layout,
    refuse_sync_batchnorm,
    settings_blocking_dynamic_sharing,
)
from lightning_fedhog.compression import Compression
from lightning_fedhog.config import (
    PRESETS,
    AveragingMode,
    FedHogConfig,
    auto_workers_per_device,
    available_cpus,
    external_workers_per_device,
)
from lightning_fedhog.coordination import Coordination, meet_peers
from lightning_fedhog.device_copy import release, share_parameters
from lightning_fedhog.device_sync import AveragingBackend, leader_backend, settle
from lightning_fedhog.engine import AveragingEngine
from lightning_fedhog.faults import check_sigterm_locally, install_stop_handler
from lightning_fedhog.launcher import FedHogLauncher, exit_with_launcher
from lightning_fedhog.layout import DeviceLayout, join_default_group, store_key
from lightning_fedhog.partial import PartialSteps
from lightning_fedhog.shared_buffer import SharedFlatBuffer, unbind_module
from lightning_fedhog.stragglers import StragglerWatch
from lightning_fedhog.telemetry import Telemetry, log_as_lightning_does
from lightning_fedhog.topology import Topology
from lightning_fedhog.work_sharing import SHARING_KEY, DynamicWork, WorkSharing, loader_blocker

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


class FedHogStrategy(PerWorkerCheckpoints):
    """Hogwild! workers per device on one shared parameter copy, with non-blocking averaging between devices.

    ``Trainer(strategy=FedHogStrategy(...), devices=N, num_nodes=M)`` runs ``M * N * workers_per_device`` worker
    processes. Worker ``local_rank`` uses device ``local_rank // workers_per_device``; the first worker of a
    device (its *leader*) also runs the averaging engine. The ``DistributedSampler`` shards over all workers, so
    an epoch still sees the data set once. Process-group set-up, barriers and broadcasts come from
    :class:`~lightning.pytorch.strategies.DDPStrategy`, but the model is never wrapped in
    ``DistributedDataParallel``: gradients are not all-reduced, models are averaged.

    The knobs are those of :class:`~lightning_fedhog.FedHogConfig`, which says what each does and when to change
    it (a test keeps this signature and the config's fields identical). ``accelerator``, ``parallel_devices``,
    ``cluster_environment``, ``checkpoint_io`` and ``precision_plugin`` are as for every Lightning strategy; the
    ``Trainer`` fills them in. Several devices on one GPU: ``parallel_devices=[torch.device("cuda", 0)] * 2``.
    """

    strategy_name = "fedhog"

    def __init__(
        self,
        workers_per_device: int | Literal["auto"] = "auto",
        averaging: AveragingMode = "allreduce",
        averaging_period: int | Literal["auto"] = 16,
        averaging_warmup_epochs: int = 0,
        num_blocks: int = 1,
        timeout: timedelta = timedelta(minutes=30),
        topology: Topology = "exponential",
        block_rule: BlockRule = "round_robin",
        seed: int = 0,
        partial_backprop: int | float | None = None,
        partition: Partition = "numel",
        rotate_ownership: bool = False,
        work_sharing: WorkSharing = "auto",
        nonfinite: Literal["stop", "skip"] = "stop",
        averaging_backend: AveragingBackend = "auto",
        compression: Compression = "auto",
        rounds_in_flight: int = 1,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        given = locals()  # the knobs are FedHogConfig's fields, in the same order (a test keeps them identical)
        self.config = FedHogConfig(**{field.name: given[field.name] for field in dataclasses.fields(FedHogConfig)})
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin, process_group_backend="gloo",
            timeout=timeout,
        )
        self.buffer: SharedFlatBuffer | None = None
        self.engine: AveragingEngine | None = None
        self.leader_backend: str | None = None  # "nccl" or "gloo", known once the Trainer set the devices
        self.work: DynamicWork | None = None  # with work_sharing="dynamic", during fit
        self.telemetry = Telemetry()
        self.coordination: Coordination | None = None  # the meetings with every worker, during fit
        self._leader_group: Any = None
        self._generation = 0
        self._consensus_first: ConsensusFirst | None = None
        self._stragglers: StragglerWatch | None = None  # with static shards, during fit
        self._carried_budget: dict[str, Any] | None = None  # dynamic sharing's budget as the last fit left it
        self._reload_setting: int | None = None  # the user's reload_dataloaders_every_n_epochs while "auto" switches
        self._partial = (
            PartialSteps(self.config.partial_backprop, partition, rotate_ownership)
            if self.config.partial_backprop is not None
            else None
        )

    # ------------------------------------------------------------------------------------------ process layout
    @property
    def workers_per_device(self) -> int:
        """K; ``"auto"`` is chosen on first use, once the Trainer has set the devices (Lightning reads the process
        count in ``set_world_ranks``, before the launcher exists), and the config then holds the number."""
        workers = self.config.workers_per_device
        if workers == "auto":
            workers = self._choose_workers()
            self.config = dataclasses.replace(self.config, workers_per_device=workers)
        return workers

    def _choose_workers(self) -> int:
        devices = self.parallel_devices or []
        if self.accelerator is None or not devices or self.cluster_environment is None:
            raise RuntimeError(
                "fedhog: `workers_per_device='auto'` is chosen once the Trainer has set the accelerator and the"
                " devices. HINT: read it from `trainer.strategy` after `Trainer(...)`, or pass a number."
            )
        environment = self.cluster_environment
        if environment.creates_processes_externally:  # torchrun, SLURM, or a worker this launcher started
            processes = int(os.environ.get("WORLD_SIZE", environment.world_size()))
            return external_workers_per_device(processes, len(devices), self.num_nodes)
        workers = auto_workers_per_device(
            devices[0].type, len(devices), available_cpus(), partial_backprop=self.config.partial_backprop is not None
        )
        rank_zero_info(f"fedhog: workers_per_device='auto' chose {workers} per {devices[0].type} device.")
        return workers

    @property
    def layout(self) -> DeviceLayout:
        return DeviceLayout(
            self.workers_per_device, len(self.parallel_devices or []), self.local_rank, self.node_rank, self.world_size
        )

    @property
    @override
    def num_processes(self) -> int:
        """Processes per node: ``devices * workers_per_device``."""
        return len(self.parallel_devices or []) * self.workers_per_device

    @property
    @override
    def root_device(self) -> torch.device:
        if not self.parallel_devices:
            raise RuntimeError("fedhog: `parallel_devices` is not set yet; the Trainer sets it.")
        return self.parallel_devices[self.layout.local_device]

    def _key(self, name: str) -> str:
        return store_key(name, self._generation)

    @property
    def _layer_sync(self) -> None:
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Any) -> None:
        refuse_sync_batchnorm(layer_sync)

    @override
    def _configure_launcher(self) -> None:
        check_accelerator(self.accelerator)
        if self.cluster_environment is None:
            raise RuntimeError("fedhog: the Trainer did not set a cluster environment.")
        # refused here, at `Trainer(...)`, before any worker exists
        self.leader_backend = leader_backend(self.config.averaging_backend, self.parallel_devices or [])
        processes = self.num_processes  # chooses `workers_per_device="auto"` if Lightning has not asked yet
        self._launcher = FedHogLauncher(self.cluster_environment, processes, self.num_nodes, self.config)

    @override
    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        if self.cluster_environment is None:
            raise RuntimeError("fedhog: the Trainer did not set a cluster environment.")
        join_default_group(self.cluster_environment, self.config.timeout)

    @override
    def setup_environment(self) -> None:
        exit_with_launcher()
        super().setup_environment()
        self._generation += 1  # store keys unique to this fit: loaders may be set up before `setup`
        trainer = self._trainer()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        # before the user's `setup` hook, which may already read `trainer.estimated_stepping_batches`
        self._consensus_first = ConsensusFirst(self.consensus, self._epoch_ends, self._epoch_over)
        trainer.callbacks.insert(0, self._consensus_first)
        mode = self.config.work_sharing
        carried = mode == "auto" and self._carried_budget is not None  # the last fit switched: steps differ by rank
        if carried and (blocker := settings_blocking_dynamic_sharing(trainer)) is not None:
            raise ValueError(
                f"fedhog: this Trainer's previous `fit` switched to dynamic work sharing (`work_sharing='auto'`), so"
                f" its workers' step counts differ and this `fit` must share work dynamically too, but {blocker}"
            )
        if mode == "dynamic" or carried:
            self._share_dynamically(trainer)
        else:
            self._stragglers = StragglerWatch(  # `num_devices` counts every node's devices
                self.gather_object, self.layout.device_index, self.layout.num_devices, report=self.is_global_zero,
                switch=self._switch_to_dynamic if mode == "auto" else None,
            )

    def _share_dynamically(self, trainer: pl.Trainer, attach: bool = True) -> None:
        self.work = DynamicWork(self.world_size, self.global_rank, carried=self._carried_budget)
        if attach:
            self.work.attach(trainer)
        self._stragglers = None

    def _switch_to_dynamic(self) -> str | None:
        """``work_sharing="auto"`` measured idle devices: dynamic sharing from the next epoch on (the loader is set up
        again then). Called at the same epoch-end meeting on every rank, which all decide alike from the same figures.

        Returns:
            None when it switched, else why the run's settings rule dynamic sharing out.
        """
        trainer = self._trainer()
        blocker = settings_blocking_dynamic_sharing(trainer) or loader_blocker(trainer)
        if blocker is not None:
            return blocker
        self._share_dynamically(trainer, attach=False)  # the estimate stays Lightning's until the new loader exists
        self._reload_setting = trainer.reload_dataloaders_every_n_epochs  # given back once the loader is new
        return None

    def _epoch_over(self) -> None:
        """After the epoch's validation: a switch decided in this epoch sets the training loader up again at the next
        epoch's start (only then, or the validation loader would be set up again as well)."""
        if self._reload_setting is not None:
            self._trainer().reload_dataloaders_every_n_epochs = 1

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # DDPStrategy.setup without the DistributedDataParallel wrapper (its body is fingerprinted by a canary test)
        if self.accelerator is None or self.model is None:
            raise RuntimeError("fedhog: setup() called before the Trainer connected the model and accelerator.")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._share_parameters()
            internals.replace_sigterm_broadcast(trainer, lambda: check_sigterm_locally(trainer))
            self.setup_optimizers(trainer)
            if self.work is not None:
                self.work.pace(trainer, self.lr_scheduler_configs)
        else:
            internals.sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            internals.optimizers_to_device(self.optimizers, self.root_device)

    def _share_parameters(self) -> None:
        """Moves the module into the device's shared flat buffer, gives every device rank 0's values, meets peers."""
        module = self._module()
        layout = checked_layout(self.config, module)  # again here: `configure_model` may have built the layers
        place = self.layout
        store = internals.default_store()
        copy = share_parameters(
            module, layout, place, self.root_device, self.parallel_devices or [], store,
            self._key(f"device{place.device_index}"), self.config.timeout, self.config.averaging_backend,
        )
        self.buffer, self._leader_group = copy.buffer, copy.leader_group
        self.leader_backend = copy.leader_backend or self.leader_backend
        peers, faults, points = meet_peers(
            store, self._key, rank=self.global_rank, device=place.device_index, slot=place.slot,
            world_size=self.world_size, timeout=self.config.timeout, engine=lambda: self.engine,
            settle=lambda: settle(self.root_device),
        )
        self.telemetry = Telemetry()  # this fit's figures only
        self.coordination = Coordination(
            points, faults, self.telemetry, gather=self.gather_object, stop=self._stop, engine=lambda: self.engine,
            publish=partial(self.telemetry.publish, self._trainer()) if self.is_global_zero else None,
            stragglers=self._stragglers, device=place.device_index,
        )
        self.barrier("fedhog-shared")
        peers.load()
        log.debug("fedhog: rank %d shares %d elements on %s", self.global_rank, layout.numel, self.root_device)

    # ---------------------------------------------------------------------------------------- training hooks
    @override
    def on_train_start(self) -> None:
        trainer = self._trainer()
        if self.buffer is not None and self._leader_group is not None and self.layout.is_leader:
            self.engine = AveragingEngine.configured(
                self.config, self.buffer.flat, self.buffer.device_steps, self._leader_group, self.layout.leader_ranks,
                period=self.config.period_at(trainer.current_epoch),
            )
            self.engine.start()
        if self.buffer is not None and self.coordination is not None:
            self.coordination.training_starts()
            if self.work is None:  # static shards: one collective, once per fit
                check_equal_batches(self.gather_object(trainer.num_training_batches))
            install_stop_handler(self.coordination.faults, internals.user_sigterm_handler(trainer))
        if self.work is not None:
            self.work.on_train_start(trainer)
        self._log_work_sharing(trainer)
        if self._partial is not None:
            self._partial.begin(self._module(), trainer.max_epochs, self.workers_per_device)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.coordination is not None:
            self.coordination.before_batch(batch)
        if self.work is not None:
            self.work.on_train_batch()
        if self.engine is not None:
            self.engine.period = self.config.period_at(self._trainer().current_epoch)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the user's ``training_step``; on a partial step only the worker's block requires gradients."""
        if self._partial is None or self.buffer is None:
            return super().training_step(*args, **kwargs)
        worker_steps = int(self.buffer.steps[self.layout.slot])
        with self._partial.step(self._module(), self._trainer().current_epoch, worker_steps, self.layout.slot):
            return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.buffer is not None:
            self.buffer.steps[self.layout.slot] += 1
        return output

    @override
    def on_validation_start(self) -> None:
        self.consensus()

    @override
    def on_train_end(self) -> None:
        self.consensus()
        if self.engine is not None:
            self.engine.stop()
            self.engine = None

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Under dynamic sharing, gives the training loader a sampler fed by the run's shared counter."""
        trainer = self._trainer()
        if self.work is None or not trainer.training:
            return dataloader
        loader = self.work.loader(dataloader, trainer, internals.default_store(), self._key("work"))
        if self._reload_setting is not None:  # the first loader after `"auto"` switched
            trainer.reload_dataloaders_every_n_epochs, self._reload_setting = self._reload_setting, None
            self.work.attach(trainer)
            self.work.pace(trainer, self.lr_scheduler_configs)
            self._log_work_sharing(trainer)
        return loader

    def _log_work_sharing(self, trainer: pl.Trainer) -> None:
        """``fedhog/work_sharing`` through the Trainer's loggers: 1 once batches are shared dynamically, else 0."""
        if self.is_global_zero and self.config.work_sharing == "auto":
            log_as_lightning_does(trainer, {"fedhog/work_sharing": float(self.work is not None)})

    # ------------------------------------------------------------------------------------------- consensus
    def consensus(self) -> None:
        """Makes every device hold the exact average of all devices' copies, with every worker parked.

        A collective over all workers (:class:`~lightning_fedhog.coordination.Coordination`); Lightning calls it
        at the same points on every rank: validation start, checkpoint save, end of fit.
        """
        if self.coordination is not None:
            self.coordination.consensus()

    def _epoch_ends(self, epoch: int, skipped: bool) -> None:
        """Every worker meets once per epoch after its last batch, before any epoch-end collective (the stop is
        agreed there, :class:`~lightning_fedhog.coordination.Coordination`)."""
        if self.coordination is not None:
            self.coordination.epoch_ends(epoch, skipped)

    def _stop(self) -> NoReturn:
        """Every rank agreed to stop (SIGTERM): saves a resumable checkpoint of the consensus model and stops.

        :class:`SIGTERMException` then ends ``fit`` the way Lightning does on SIGTERM (a ``SystemExit``: the script
        ends with status 0 unless it catches it).
        """
        save_stop_checkpoint(self._trainer(), self.broadcast)
        raise SIGTERMException()

    # -------------------------------------------------------------------------------------------- checkpoints
    @override
    def _workers_independent(self) -> bool:
        return self.buffer is not None

    @override
    def extra_checkpoint_state(self) -> dict[str, Any]:
        """How work is shared (``"auto"`` resumes into it) and, under dynamic sharing, what the run's ``max_steps``
        budget has spent (the same on every rank)."""
        if self.work is None:
            return {SHARING_KEY: "static"}
        return {SHARING_KEY: "dynamic", **self.work.checkpoint_state()}

    @override
    def load_extra_checkpoint_state(self, checkpoint: Mapping[str, Any]) -> None:
        trainer = self._trainer()
        if trainer.state.fn != TrainerFn.FITTING:  # `validate`/`test` from a checkpoint: no work to share
            return
        if self.config.work_sharing == "auto" and self.work is None and checkpoint.get(SHARING_KEY) == "dynamic":
            blocker = settings_blocking_dynamic_sharing(trainer)
            if blocker is None:
                self._share_dynamically(trainer)  # before `setup`: the coordination is built without stragglers
            elif self.is_global_zero:  # every rank resumes from the same step, so static shards are safe
                log.warning(  # through logging: advice that a `warnings` filter should not swallow
                    "fedhog: the checkpoint was saved while work was shared dynamically (`work_sharing='auto'`"
                    " switched), but this run's settings rule that out, so it resumes with static shards: %s", blocker
                )
        if self.work is not None:
            self.work.resume_from(checkpoint, trainer)

    # ----------------------------------------------------------------------------------------------- teardown
    @override
    def on_exception(self, exception: BaseException) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.coordination is not None:
            self.coordination.failed(exception)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        failed = self.coordination.finish() if self.coordination is not None else False
        self.coordination = None
        clean = True  # destroying a group that a blocked thread still uses could hang
        if self.engine is not None:
            clean = self.engine.stop()
            self.engine = None
        module = self.lightning_module
        trainer = internals.attached_trainer(module)
        if self.buffer is not None:
            if module is not None:
                unbind_module(module)
            if trainer is not None:
                internals.restore_sigterm_broadcast(trainer)
            self._release_buffer(wait=not failed)
        if trainer is not None:  # give back what `fit` changed on the Trainer: callbacks, limits, schedulers, class
            if self._consensus_first in trainer.callbacks:
                trainer.callbacks.remove(self._consensus_first)
            if self.work is not None:
                self._carried_budget = self.work.carried_budget() or self._carried_budget
                self.work.detach(trainer, self.lr_scheduler_configs)
            if self._reload_setting is not None:  # "auto" switched after the last epoch's loader was set up
                trainer.reload_dataloaders_every_n_epochs, self._reload_setting = self._reload_setting, None
        self.work, self._stragglers, self._consensus_first = None, None, None
        if self._partial is not None:
            self._partial.clear()
        if self._leader_group is not None and clean:
            dist.destroy_process_group(self._leader_group)
        self._leader_group = None
        super().teardown()

    def _release_buffer(self, wait: bool) -> None:
        self.buffer = None
        if wait and dist.is_initialized():  # the store is the default group's
            key = self._key(f"device{self.layout.device_index}/released")
            release(self.root_device, self.layout, internals.default_store(), key, self.config.timeout)

    def _module(self) -> pl.LightningModule:
        module = self.lightning_module
        if module is None:
            raise RuntimeError("fedhog: no LightningModule attached.")
        return module

    def _trainer(self) -> pl.Trainer:
        trainer = internals.attached_trainer(self.lightning_module)
        if trainer is None:
            raise RuntimeError("fedhog: the LightningModule is not attached to a Trainer.")
        return trainer

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: internals.StrategyRegistry) -> None:
        for name, (description, init_params) in PRESETS.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **init_params)
