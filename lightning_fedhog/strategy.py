"""``FedHogStrategy``: federated SGD with local asynchrony as a Lightning strategy.

K worker processes per device run lock-free (Hogwild!) SGD on one shared copy of the parameters, and devices
mix their copies in the background by block-wise, in-place averaging (LAP-SGD, Chatterjee, Kungurtsev and
Alistarh, "Federated SGD with local asynchrony", ICDCS 2024). Every worker is a full Lightning rank with its own
loop, data shard and optimizer; this class is the glue between Lightning's hooks and the parts that do the work:
the shared buffer (:mod:`~lightning_fedhog.shared_buffer`), the averaging engine (:mod:`~lightning_fedhog.engine`),
the meetings with the other workers (:mod:`~lightning_fedhog.coordination`: consensus points, the agreed stop,
failures, telemetry), checkpoints (:mod:`~lightning_fedhog.checkpoints`), work sharing
(:mod:`~lightning_fedhog.work_plan`) and partial backprop.

What lives for one ``fit`` (the shared vector, the engine, the meetings, the work plan) is one :class:`FitState`,
made when the environment is set up for ``fit`` and dropped at teardown; ``validate``, ``test`` and ``predict``
have none and run as plain DDP without the wrapper.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_fedhog import internals
from lightning_fedhog.blocks import BlockRule
from lightning_fedhog.callbacks import ConsensusFirst
from lightning_fedhog.checkpoints import (
    CHECKPOINT_KEY,
    add_every_workers_optimizer_state,
    on_cpu,
    own_optimizer_states,
    rescue_path,
    save_stop_checkpoint,
    write_rescue,
)
from lightning_fedhog.checks import check_accelerator, check_equal_batches, checked_layout, refuse_sync_batchnorm
from lightning_fedhog.compression import Compression
from lightning_fedhog.config import (
    DEFAULT_AVERAGING_PERIOD,
    DEFAULT_TIMEOUT,
    PRESETS,
    AveragingMode,
    FedHogConfig,
    WorkSharing,
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
from lightning_fedhog.partial import PartialSteps
from lightning_fedhog.partitions import Partition
from lightning_fedhog.placement import Placement
from lightning_fedhog.rendezvous import attempt_token, join_default_group, store_key
from lightning_fedhog.rescue import (
    GROUP_TIMEOUT,
    JOIN_SECONDS,
    RescueError,
    RescueMeeting,
    describe_trained,
    gather_rescue,
)
from lightning_fedhog.shared_buffer import SharedFlatBuffer, unbind_module
from lightning_fedhog.stragglers import StragglerWatch
from lightning_fedhog.telemetry import Telemetry
from lightning_fedhog.topology import Topology
from lightning_fedhog.work_plan import WorkPlan
from lightning_fedhog.work_sharing import RESCUE_KEY, DynamicWork

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

LOCAL_REDUCE_WARNING = (
    "fedhog: a value logged with `sync_dist=True` inside a training batch is reported for each worker on its own,"
    " because syncing it every step would stall all workers. Epoch-level values (`on_epoch=True`) are still reduced"
    " over all workers at the end of the epoch."
)


@dataclass
class SharedCopy:
    """The device's shared vector and the meetings over it, made together when ``setup`` shares the parameters."""

    buffer: SharedFlatBuffer
    leader_group: Any  # the device leaders' group (None: one device)
    coordination: Coordination


@dataclass
class FitState:
    """What one ``fit`` holds: made when the environment is set up for ``fit``, dropped at teardown."""

    plan: WorkPlan
    meetings: ConsensusFirst  # first in `trainer.callbacks` during the fit
    telemetry: Telemetry = field(default_factory=Telemetry)
    shared: SharedCopy | None = None  # from `setup` on
    engine: AveragingEngine | None = None  # a device leader's, from `on_train_start` to the end of training
    rescuing: bool = False  # a survivor writes a rescue: no consensus point (the default group is broken)
    failed: bool = False  # the engine was stopped and the rescue tried after a failure


class FedHogStrategy(DDPStrategy):
    """Hogwild! workers per device on one shared parameter copy, with non-blocking averaging between devices.

    ``Trainer(strategy=FedHogStrategy(...), devices=N, num_nodes=M)`` runs ``M * N * workers_per_device`` worker
    processes. Worker ``local_rank`` uses device ``local_rank // workers_per_device``; the first worker of a
    device (its *leader*) also runs the averaging engine. The ``DistributedSampler`` shards over all workers, so
    an epoch still sees the data set once. Process-group set-up, barriers and broadcasts come from
    :class:`~lightning.pytorch.strategies.DDPStrategy`, but the model is never wrapped in
    ``DistributedDataParallel``: gradients are not all-reduced, models are averaged.

    The knobs are those of :class:`~lightning_fedhog.FedHogConfig`, which says under each field what it does and when
    to change it (a test keeps this signature and the config's fields identical). ``accelerator``,
    ``parallel_devices``, ``cluster_environment``, ``checkpoint_io`` and ``precision_plugin`` are as for every
    Lightning strategy; the ``Trainer`` fills them in. Several devices on one GPU:
    ``parallel_devices=[torch.device("cuda", 0)] * 2``.
    """

    strategy_name = "fedhog"

    def __init__(
        self,
        workers_per_device: int | Literal["auto"] = "auto",
        averaging: AveragingMode = "allreduce",
        averaging_period: int | Literal["auto"] = DEFAULT_AVERAGING_PERIOD,
        averaging_warmup_epochs: int = 0,
        num_blocks: int = 1,
        timeout: timedelta = DEFAULT_TIMEOUT,
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
        self.config = FedHogConfig(
            workers_per_device=workers_per_device,
            averaging=averaging,
            averaging_period=averaging_period,
            averaging_warmup_epochs=averaging_warmup_epochs,
            num_blocks=num_blocks,
            timeout=timeout,
            topology=topology,
            block_rule=block_rule,
            seed=seed,
            partial_backprop=partial_backprop,
            partition=partition,
            rotate_ownership=rotate_ownership,
            work_sharing=work_sharing,
            nonfinite=nonfinite,
            averaging_backend=averaging_backend,
            compression=compression,
            rounds_in_flight=rounds_in_flight,
        )
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin, process_group_backend="gloo",
            timeout=timeout,
        )
        self.leader_backend: str | None = None  # "nccl" or "gloo", known once the Trainer set the devices
        self._fit: FitState | None = None
        self._placement: Placement | None = None  # computed once the ranks are known
        self._generation = 0  # set-ups so far: store keys unique to one fit
        self._attempt = "0"  # this start of the processes, agreed once the default group exists
        self._carried_budget: dict[str, Any] | None = None  # dynamic sharing's budget as the last fit left it
        self._warned_local_reduce = False
        self._partial = (
            PartialSteps(self.config.partial_backprop, partition, rotate_ownership)
            if self.config.partial_backprop is not None
            else None
        )

    # ----------------------------------------------------------------------------------- processes and placement
    @property
    def workers_per_device(self) -> int:
        """K; ``"auto"`` is chosen on first use, once the Trainer has set the devices (Lightning reads the process
        count in ``set_world_ranks``, before the launcher exists), and the config then holds the number."""
        workers = self.config.workers_per_device
        if workers == "auto":
            workers = self._choose_workers()
            self.config = dataclasses.replace(self.config, workers_per_device=workers)
            self._placement = None
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
    def placement(self) -> Placement:
        """This worker's device, slot and the device leaders, computed once the ranks are set."""
        if self._placement is None:
            self._placement = Placement(
                self.workers_per_device, len(self.parallel_devices or []), self.local_rank, self.node_rank,
                self.world_size,
            )
        return self._placement

    @override
    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        self._placement = None  # the ranks are (re)set: in the launching process, then in every worker

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
        return self.parallel_devices[self.placement.local_device]

    def _key(self, name: str) -> str:
        return store_key(name, self._generation, self._attempt)

    @property
    def _layer_sync(self) -> None:  # an override point (internals.OVERRIDE_POINTS): `sync_batchnorm=True` is refused
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Any) -> None:
        refuse_sync_batchnorm(layer_sync)

    @override
    def _configure_launcher(self) -> None:  # an override point (internals.OVERRIDE_POINTS)
        check_accelerator(self.accelerator)
        if self.cluster_environment is None:
            raise RuntimeError("fedhog: the Trainer did not set a cluster environment.")
        # refused here, at `Trainer(...)`, before any worker exists
        self.leader_backend = leader_backend(self.config.averaging_backend, self.parallel_devices or [])
        processes = self.num_processes  # chooses `workers_per_device="auto"` if Lightning has not asked yet
        self._launcher = FedHogLauncher(
            self.cluster_environment, processes, self.num_nodes, self.config, after_failure=self._after_failure
        )

    @override
    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        if self.cluster_environment is None:
            raise RuntimeError("fedhog: the Trainer did not set a cluster environment.")
        join_default_group(self.cluster_environment, self.config.timeout)
        self._attempt = attempt_token()

    @override
    def setup_environment(self) -> None:
        exit_with_launcher()
        super().setup_environment()
        self._generation += 1  # store keys unique to this fit: loaders may be set up before `setup`
        trainer = self._trainer()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        place = self.placement
        plan = WorkPlan(
            self.config.work_sharing, world_size=self.world_size, rank=self.global_rank, report=self.is_global_zero,
            carried=self._carried_budget,
            watch=lambda switch: StragglerWatch(  # `num_devices` counts every node's devices
                self.gather_object, place.device_index, place.num_devices, report=self.is_global_zero, switch=switch
            ),
        )
        meetings = ConsensusFirst(self.consensus, self._epoch_ends, partial(plan.epoch_over, trainer))
        self._fit = FitState(plan, meetings)
        # before the user's `setup` hook, which may already read `trainer.estimated_stepping_batches`
        trainer.callbacks.insert(0, meetings)
        plan.begin(trainer)

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # DDPStrategy.setup without the DistributedDataParallel wrapper (its body is fingerprinted by a canary test)
        if self.accelerator is None or self.model is None:
            raise RuntimeError("fedhog: setup() called before the Trainer connected the model and accelerator.")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fit = self._fit
        if fit is not None:
            fit.shared = self._share_parameters(fit)
            internals.replace_sigterm_broadcast(trainer, lambda: check_sigterm_locally(trainer))
            self.setup_optimizers(trainer)
            fit.plan.set_up(trainer, self.lr_scheduler_configs)
        else:
            internals.sync_module_states(self.model)
        self.setup_precision_plugin()
        if fit is not None:
            internals.optimizers_to_device(self.optimizers, self.root_device)

    def _share_parameters(self, fit: FitState) -> SharedCopy:
        """Moves the module into the device's shared flat buffer, gives every device rank 0's values, meets peers."""
        module = self._module()
        layout = checked_layout(self.config, module)  # again here: `configure_model` may have built the layers
        place = self.placement
        store = internals.default_store()
        copy = share_parameters(
            module, layout, place, self.root_device, self.parallel_devices or [], store,
            self._key(f"device{place.device_index}"), self.config.timeout, self.config.averaging_backend,
        )
        self.leader_backend = copy.leader_backend or self.leader_backend
        try:
            peers, faults, points = meet_peers(
                store, self._key, rank=self.global_rank, device=place.device_index, slot=place.slot,
                world_size=self.world_size, timeout=self.config.timeout, engine=self._engine,
                settle=lambda: settle(self.root_device),
            )
            coordination = Coordination(
                points, faults, fit.telemetry, gather=self.gather_object, stop=self._stop, engine=self._engine,
                publish=partial(fit.telemetry.publish, self._trainer()) if self.is_global_zero else None,
                stragglers=fit.plan.stragglers, device=place.device_index,
            )
            self.barrier("fedhog-shared")  # fails when a peer died during its own set-up
            peers.load()
        except BaseException:  # teardown knows nothing of the copy yet: give back what sharing it took
            unbind_module(module)
            if copy.leader_group is not None:
                dist.destroy_process_group(copy.leader_group)
            raise
        log.debug("fedhog: rank %d shares %d elements on %s", self.global_rank, layout.numel, self.root_device)
        return SharedCopy(copy.buffer, copy.leader_group, coordination)

    @property
    def work(self) -> DynamicWork | None:
        """The dynamic work sharing of the ``fit`` in progress (None with static shards and outside ``fit``)."""
        return self._fit.plan.work if self._fit is not None else None

    def _engine(self) -> AveragingEngine | None:
        return self._fit.engine if self._fit is not None else None

    def _shared(self) -> SharedCopy | None:
        """This fit's shared copy once ``setup`` made it (None outside ``fit``)."""
        return self._fit.shared if self._fit is not None else None

    # ---------------------------------------------------------------------------------------- training hooks
    @override
    def on_train_start(self) -> None:
        fit, trainer = self._fit, self._trainer()
        if fit is None or fit.shared is None:
            return
        shared, place = fit.shared, self.placement
        if shared.leader_group is not None and place.is_leader:
            fit.engine = AveragingEngine.configured(
                self.config, shared.buffer.flat, shared.buffer.device_steps, shared.leader_group, place.leader_ranks,
                period=self.config.period_at(trainer.current_epoch), sole_worker=place.workers_per_device == 1,
            )
            fit.engine.start()
        shared.coordination.training_starts()
        if fit.plan.work is None:  # static shards: one collective, once per fit
            check_equal_batches(self.gather_object(trainer.num_training_batches))
        install_stop_handler(shared.coordination.faults, internals.user_sigterm_handler(trainer))
        fit.plan.training_starts(trainer)
        if self._partial is not None:
            self._partial.begin(self._module(), trainer.max_epochs, self.workers_per_device)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        fit = self._fit
        if fit is None or fit.shared is None:
            return
        fit.shared.coordination.before_batch(batch)
        fit.plan.batch_starts()
        if fit.engine is not None:
            fit.engine.period = self.config.period_at(self._trainer().current_epoch)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the user's ``training_step``; on a partial step only the worker's block requires gradients."""
        shared = self._shared()
        if self._partial is None or shared is None:
            return super().training_step(*args, **kwargs)
        slot = self.placement.slot
        with self._partial.step(self._module(), self._trainer().current_epoch, int(shared.buffer.steps[slot]), slot):
            return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if (shared := self._shared()) is not None:
            shared.buffer.steps[self.placement.slot] += 1
        return output

    @override
    def on_validation_start(self) -> None:
        self.consensus()

    @override
    def on_train_end(self) -> None:
        self.consensus(exact=True)
        if self._fit is not None and self._fit.engine is not None:
            self._fit.engine.stop()
            self._fit.engine = None

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Under dynamic sharing, gives the training loader a sampler fed by the run's shared counter."""
        if self._fit is None:
            return dataloader
        return self._fit.plan.loader(
            dataloader, self._trainer(), internals.default_store(), self._key("work"), self.lr_scheduler_configs
        )

    # ------------------------------------------------------------------------------------------- consensus
    def consensus(self, exact: bool = False) -> None:
        """Makes every device hold the same model, the average of all devices' copies, with every worker parked.

        A collective over all workers (:class:`~lightning_fedhog.coordination.Coordination`); Lightning calls it
        at the same points on every rank: validation start, checkpoint save, end of fit. Where the rounds compress,
        validation and checkpoints get the model every device agreed on with compressed codes (within quantisation
        error of the exact average, nothing dropped from the copies); ``exact`` (the end of fit) the exact average.
        The points of the last epoch that ``max_epochs`` allows are exact too, the same on every rank (the epoch is
        agreed): the last checkpoint of such a run then holds the model ``fit`` hands over, and the end of ``fit``,
        still parked there, sends nothing more.
        """
        if (shared := self._shared()) is not None and not self._fit.rescuing:  # type: ignore[union-attr]
            shared.coordination.consensus(exact or self._in_last_epoch())

    def _in_last_epoch(self) -> bool:
        trainer = self._trainer()
        return trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs - 1

    def _epoch_ends(self, epoch: int, skipped: bool) -> None:
        """Every worker meets once per epoch after its last batch, before any epoch-end collective (the stop is
        agreed there, :class:`~lightning_fedhog.coordination.Coordination`)."""
        if (shared := self._shared()) is not None:
            shared.coordination.epoch_ends(epoch, skipped)

    def _stop(self) -> NoReturn:
        """Every rank agreed to stop (SIGTERM): saves a resumable checkpoint of the consensus model and stops.

        :class:`SIGTERMException` then ends ``fit`` the way Lightning does on SIGTERM (a ``SystemExit``: the script
        ends with status 0 unless it catches it). Every rank is parked at the same consensus point here, which is
        made exact first: the run resumes from the exact average, as from the end of ``fit``, whatever the rounds
        sent.
        """
        self.consensus(exact=True)
        save_stop_checkpoint(self._trainer(), self.broadcast)
        raise SIGTERMException()

    # ------------------------------------------------------------------------------------------- reductions
    @override
    def reduce(self, tensor: Tensor, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Tensor:
        """All-reduces ``tensor``, except inside a training batch of ``fit``, where the worker's own value is returned.

        fedhog's workers never meet during a training step: a per-step ``self.log(..., sync_dist=True)`` would put
        every worker in lock-step with the slowest. Values logged per step are therefore the worker's own; values
        accumulated per epoch are still reduced over all workers when the epoch ends, outside the batch.
        """
        trainer = internals.attached_trainer(self.lightning_module)
        independent = self._shared() is not None and trainer is not None and internals.in_training_batch(trainer)
        if isinstance(tensor, Tensor) and independent:
            if not self._warned_local_reduce:
                self._warned_local_reduce = True
                rank_zero_warn(LOCAL_REDUCE_WARNING)
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # decisions (early stopping, ...) must agree on all ranks: always reduce them for real
        total = internals.sync_ddp_if_available(
            torch.tensor(int(decision), device=self.root_device), None, reduce_op=ReduceOp.SUM  # type: ignore[arg-type]
        )
        return bool(total == self.world_size) if all else bool(total)

    def gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a collective over all workers), indexed by global rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather_object_to_zero(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 only (None elsewhere): a collective over all workers that moves each
        value once, where :meth:`gather_object` sends every value to every rank."""
        gathered: list[Any] | None = [None] * self.world_size if self.global_rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    # -------------------------------------------------------------------------------------------- checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model: a consensus point comes first (a collective; every rank saves)."""
        self.consensus()
        return super().lightning_module_state_dict()

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: internals.PathLike, storage_options: Any | None = None
    ) -> None:
        """Adds every worker's optimizer state (Lightning keeps rank 0's only) and how work is shared to the
        checkpoint (all ranks call this), then lets rank 0 write it."""
        if self.world_size > 1 and dist.is_initialized():
            add_every_workers_optimizer_state(checkpoint, self.world_size, self.gather_object_to_zero)
        if self._fit is not None:
            checkpoint.update(self._fit.plan.checkpoint_state())
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: internals.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if (rescue := checkpoint.get(RESCUE_KEY)) is not None:
            rank_zero_info(
                f"fedhog: resuming from a rescue, saved by {len(rescue['survivors'])} of {rescue['world_size']} workers"
                f" after rank(s) {', '.join(map(str, rescue['lost']))} were lost, at epoch {checkpoint.get('epoch')}"
                f"{describe_trained(rescue.get('trained'))}."
            )
        if self._fit is not None:  # `validate`/`test` from a checkpoint: no work to share
            self._fit.plan.resume_from(checkpoint, self._trainer())
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restores this worker's own optimizer state when the checkpoint has one for every rank."""
        states = own_optimizer_states(checkpoint, self.world_size, self.global_rank)
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
            internals.optimizer_to_device(optimizer, self.root_device)

    # ----------------------------------------------------------------------------------------------- teardown
    @override
    def on_exception(self, exception: BaseException) -> None:
        self._after_failure(exception)
        if (shared := self._shared()) is not None:
            shared.coordination.failed(exception)
        super().on_exception(exception)

    def _after_failure(self, error: BaseException) -> None:
        """``fit`` failed on this rank: stops the engine and, if a peer was lost, takes part in the rescue. Called
        once, by the launcher (in the launching process, before it waits for its workers to end: they may wait in
        the rescue for this rank) or else by ``on_exception``."""
        fit = self._fit
        if fit is None or fit.failed:
            return
        fit.failed = True
        if fit.engine is not None:
            fit.engine.stop()
        if fit.shared is not None and fit.shared.coordination.faults.peer_lost(error):
            self._rescue(fit.shared)

    def _rescue(self, shared: SharedCopy) -> None:
        """A peer is lost: the survivors save their average, optimizer states and progress (:mod:`~.rescue`)."""
        fit, trainer, place = self._fit, self._trainer(), self.placement
        faults = shared.coordination.faults
        peers = faults.peers
        if fit is None or peers is None:
            return
        try:
            meeting = RescueMeeting(
                internals.default_store(), self._key("rescue"), rank=self.global_rank, device=place.device_index,
                world_size=self.world_size, gone=peers.gone, timeout=min(self.config.timeout, GROUP_TIMEOUT),
                # a rank that did not come to a collective within `timeout` is stuck: the others time out together
                wait=1.0 if faults.waited_out else min(JOIN_SECONDS, self.config.timeout.total_seconds() / 2),
            )
            members = meeting.members()
            states = on_cpu([optimizer.state_dict() for optimizer in self.optimizers])
            rescued = gather_rescue(meeting.group(members), members, self.global_rank, shared.buffer.flat, states)
            if rescued is None:
                return  # the first member writes it
            if not bool(torch.isfinite(rescued.average).all()):
                raise RescueError("the surviving devices' average is not finite")
            shared.buffer.flat.copy_(rescued.average)  # the module's tensors are views of it
            fit.rescuing = True
            lost = sorted(set(range(self.world_size)) - {member.rank for member in members})
            record = {"lost": lost, "survivors": [m.rank for m in members], "world_size": self.world_size}
            extra = {
                CHECKPOINT_KEY: {"world_size": len(members), "optimizer_states_per_rank": rescued.optimizer_states},
                **fit.plan.rescue_state(record),
            }
            path = rescue_path(trainer)
            trained = extra[RESCUE_KEY].get("trained")
            left = trained is not None and len(trained["chunks_trained"]) < trained["chunks"]
            write_rescue(trainer, self.checkpoint_io.save_checkpoint, path, extra, batches_left=left)
        except Exception as error:  # RescueError, or the rescue's own group broke (a second failure)
            log.error(
                "fedhog: rank %d: no rescue was saved: %s. The last checkpoint is as it was.", self.global_rank, error
            )
            return
        log.warning(
            "fedhog: rank(s) %s lost; the surviving workers (%d) saved a rescue to %s: the average of their devices'"
            " (%d) copies at epoch %d%s, and every survivor's optimizer state. Resume with"
            " `trainer.fit(..., ckpt_path=\"last\")` (the newer of `last.ckpt` and the rescue) or `ckpt_path=%r`.",
            ", ".join(map(str, lost)), len(members), path, len({m.device for m in members}), trainer.current_epoch,
            describe_trained(trained), path,
        )

    @override
    def teardown(self) -> None:
        fit, self._fit = self._fit, None
        if fit is not None:
            clean = self._end_fit(fit)  # destroying a group that a blocked thread still uses could hang
            if fit.shared is not None and fit.shared.leader_group is not None and clean:
                dist.destroy_process_group(fit.shared.leader_group)
        super().teardown()

    def _end_fit(self, fit: FitState) -> bool:
        """Stops what the fit started and gives back what it changed on the Trainer: callbacks, limits, schedulers,
        its class. Returns whether the engine stopped cleanly (its group may then be destroyed)."""
        failed = fit.shared.coordination.finish() if fit.shared is not None else False
        clean = fit.engine.stop() if fit.engine is not None else True
        module = self.lightning_module
        trainer = internals.attached_trainer(module)
        if fit.shared is not None:
            if module is not None:
                unbind_module(module)
            if trainer is not None:
                internals.restore_sigterm_broadcast(trainer)
            if not failed and dist.is_initialized():  # the store is the default group's
                key = self._key(f"device{self.placement.device_index}/released")
                release(self.root_device, self.placement, internals.default_store(), key, self.config.timeout)
        if trainer is not None and fit.meetings in trainer.callbacks:
            trainer.callbacks.remove(fit.meetings)
        self._carried_budget = fit.plan.end(trainer, self.lr_scheduler_configs)
        if self._partial is not None:
            self._partial.clear()
        return clean

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
