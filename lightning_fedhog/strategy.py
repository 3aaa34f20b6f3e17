"""``FedHogStrategy``: federated SGD with local asynchrony as a Lightning strategy.

K worker processes per device run lock-free (Hogwild!) SGD on one shared copy of the parameters, and devices
mix their copies in the background by block-wise, in-place averaging (LAP-SGD, Chatterjee, Kungurtsev and
Alistarh, "Federated SGD with local asynchrony", ICDCS 2024). Every worker is a full Lightning rank with its own
loop, data shard and optimizer; this class is the glue that makes those ranks share memory, keeps Lightning's
per-step synchronisations out of their way, and makes every device hold the exact average ("consensus") where
Lightning looks at the model: validation, checkpoints and the end of ``fit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.distributed import _init_dist_connection, _sync_ddp_if_available
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH, ReduceOp
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader, extract_batch_size
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fedhog.blocks import BlockRule, Partition, owned_block, partition_tensors, tensor_costs
from lightning_fedhog.config import AveragingMode, FedHogConfig
from lightning_fedhog.device_sync import AveragingBackend, leader_backend, settle
from lightning_fedhog.engine import AveragingEngine
from lightning_fedhog.launcher import FedHogLauncher, checked_layout
from lightning_fedhog.liveness import PeerRegistry
from lightning_fedhog.metrics import fedhog_metrics
from lightning_fedhog.partial import gradients_only_for, record_positions
from lightning_fedhog.schedule import averaging_period
from lightning_fedhog.shared_buffer import SharedFlatBuffer, bind_module, unbind_module
from lightning_fedhog.topology import Topology
from lightning_fedhog.work_sharing import SharedCounterSampler, WorkSharing

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "fedhog"
"""Checkpoint entry holding every worker's optimizer state (Lightning itself keeps only rank 0's)."""

_STARTUP_TIMEOUT = timedelta(minutes=5)
"""The least time the processes get to start and meet, whatever `timeout` (that one bounds collectives)."""

_SETTLE_SECONDS = 2.0
"""How long a rank whose collective lost a connection waits for the peer's process to be seen gone."""

_RELEASE_SECONDS = 15.0
"""The longest a device leader waits at the end of ``fit`` for its workers to let go of the shared vector."""

_LIVENESS_INTERVAL = 1.0
"""Seconds between two looks at the same-host peers' processes (and at a stop request from another host)."""


class PeerLostError(RuntimeError):
    """Another rank of the run died or failed; the message names it, and this rank stops without a checkpoint."""


class FedHogStrategy(DDPStrategy):
    """Hogwild! workers per device on one shared parameter copy, with non-blocking averaging between devices.

    ``Trainer(strategy=FedHogStrategy(...), devices=N, num_nodes=M)`` runs ``M * N * workers_per_device`` worker
    processes. Worker ``local_rank`` uses device ``local_rank // workers_per_device``; the first worker of a
    device (its *leader*) also runs the averaging engine. The ``DistributedSampler`` shards over all workers, so
    an epoch still sees the data set once.

    It inherits process-group set-up, barriers and broadcasts from :class:`~lightning.pytorch.strategies.DDPStrategy`
    but never wraps the model in ``DistributedDataParallel``: gradients are not all-reduced, models are averaged.

    Args:
        workers_per_device: K, the Hogwild! workers sharing one parameter copy per device.
        averaging: how device leaders mix their copies: ``"allreduce"`` or pairwise ``"gossip"``.
        averaging_period: device steps (summed over the K workers) between averaging rounds after warm-up.
        averaging_warmup_epochs: epochs at the start during which a round follows every device step.
        num_blocks: the flat vector is exchanged one of this many blocks per round.
        timeout: how long any collective may wait for a peer.
        topology: gossip peer schedule (``"exponential"``, ``"ring"``, ``"random"``).
        block_rule: which block a round exchanges (``"round_robin"``, ``"random"``, ``"largest_change"``).
        seed: shared seed of the random topology and block rule.
        partial_backprop: None, or the epoch from which workers alternate full and partial steps (LPP-SGD).
        partition: partial-backprop blocks of equal ``"numel"`` (the paper) or equal estimated ``"compute"``.
        rotate_ownership: every worker moves to the next partial-backprop block each epoch.
        work_sharing: ``"static"`` equal shards, or ``"dynamic"`` batches claimed from a shared counter.
        nonfinite: a round with NaN/Inf in some device's block is never applied; ``"stop"`` or ``"skip"``.
        averaging_backend: how device leaders talk: ``"auto"`` (NCCL between distinct GPUs, gloo on CPU and where
            a GPU hosts several devices), ``"nccl"`` or ``"gloo"``. Several devices on one GPU: pass
            ``parallel_devices=[torch.device("cuda", 0)] * 2``.

        See :class:`~lightning_fedhog.FedHogConfig` for when to change each knob.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: as for every
            Lightning strategy; the ``Trainer`` fills them in.
    """

    strategy_name = "fedhog"

    def __init__(
        self,
        workers_per_device: int = 2,
        averaging: AveragingMode = "allreduce",
        averaging_period: int = 16,
        averaging_warmup_epochs: int = 0,
        num_blocks: int = 1,
        timeout: timedelta = timedelta(minutes=30),
        topology: Topology = "exponential",
        block_rule: BlockRule = "round_robin",
        seed: int = 0,
        partial_backprop: int | None = None,
        partition: Partition = "numel",
        rotate_ownership: bool = False,
        work_sharing: WorkSharing = "static",
        nonfinite: Literal["stop", "skip"] = "stop",
        averaging_backend: AveragingBackend = "auto",
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
        )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend="gloo",
            timeout=timeout,
        )
        self.buffer: SharedFlatBuffer | None = None
        self.engine: AveragingEngine | None = None
        self._leader_group: Any = None
        self.leader_backend: str | None = None  # "nccl" or "gloo", known once the Trainer set the devices
        self._leader_ranks: list[int] = []
        self._generation = 0
        self._at_consensus = False
        self._warned_local_reduce = False
        self._positions: dict[int, int] | None = None
        self._remove_position_hooks: Callable[[], None] | None = None
        self._partial_blocks: list[range] | None = None
        self._partial_parameters: list[torch.nn.Parameter] = []
        self.work_sampler: SharedCounterSampler | None = None
        self._saved_max_steps: int | None = None
        self._stats_on = False
        self._interval_start = 0.0
        self._fit_start = 0.0
        self._samples = 0
        self._parked_seconds = 0.0
        self._peers: PeerRegistry | None = None
        self._next_liveness_check = 0.0
        self._stop_signal: int | None = None  # SIGTERM received (or relayed by a peer): stop at a consensus point
        self._stop_announced = False
        self._failed = False
        self._meetings = 0  # consensus points met so far in this fit (the same count on every rank)

    # ------------------------------------------------------------------------------------------ process layout
    @property
    def workers_per_device(self) -> int:
        return self.config.workers_per_device

    @property
    @override
    def num_processes(self) -> int:
        """Processes per node: ``devices * workers_per_device``."""
        return (len(self.parallel_devices) if self.parallel_devices else 0) * self.workers_per_device

    @property
    @override
    def root_device(self) -> torch.device:
        if not self.parallel_devices:
            raise RuntimeError("fedhog: `parallel_devices` is not set yet; the Trainer sets it.")
        return self.parallel_devices[self.local_rank // self.workers_per_device]

    @property
    def device_slot(self) -> int:
        """This worker's index among the K workers of its device (0 is the leader)."""
        return self.local_rank % self.workers_per_device

    @property
    def is_device_leader(self) -> bool:
        return self.device_slot == 0

    @property
    def device_index(self) -> int:
        """Index of this worker's device among all devices of the run (over all nodes)."""
        return self.node_rank * len(self.parallel_devices or []) + self.local_rank // self.workers_per_device

    def _store_key(self, name: str) -> str:
        """A rendezvous-store key unique to this fit: torchrun restarts reuse the store, so the key includes
        the restart count, and a second ``fit`` in the same processes the set-up generation."""
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"fedhog/{restart}/{self._generation}/{name}"

    @property
    def _layer_sync(self) -> None:
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Any) -> None:
        if layer_sync is not None:
            raise ValueError(
                "`Trainer(sync_batchnorm=True)` is not supported by fedhog: it would synchronise every forward pass."
                " HINT: drop `sync_batchnorm`; fedhog averages BatchNorm running statistics with the parameters."
            )

    @override
    def _configure_launcher(self) -> None:
        if self.accelerator is not None and not isinstance(self.accelerator, (CPUAccelerator, CUDAAccelerator)):
            raise ValueError(
                f"fedhog supports `accelerator='cpu'` and `accelerator='gpu'` (CUDA), not"
                f" {type(self.accelerator).__name__}. HINT: use `strategy='ddp'` on this accelerator."
            )
        if self.cluster_environment is None:
            raise RuntimeError("fedhog: the Trainer did not set a cluster environment.")
        # refused here, at `Trainer(...)`, before any worker exists
        self.leader_backend = leader_backend(self.config.averaging_backend, self.parallel_devices or [])
        self._launcher = FedHogLauncher(self.cluster_environment, self.num_processes, self.num_nodes, self.config)

    @override
    def setup_distributed(self) -> None:
        # gloo for the default group on every accelerator: NCCL allows one rank per GPU, and K workers share one.
        reset_seed()
        self.set_world_ranks()
        if self.cluster_environment is None:
            raise RuntimeError("fedhog: the Trainer did not set a cluster environment.")
        # start-up (imports, rendezvous of every process) may take longer than the failure-detection `timeout`
        startup = max(self._timeout or self.config.timeout, _STARTUP_TIMEOUT)
        _init_dist_connection(
            self.cluster_environment,
            "gloo",
            timeout=startup,
            **restart_safe_store(self.cluster_environment, startup),
        )
        _set_default_timeout(self.config.timeout)  # collectives fail after `timeout` again

    # ------------------------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if self.accelerator is None or self.model is None:
            raise RuntimeError("fedhog: setup() called before the Trainer connected the model and accelerator.")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._share_parameters()
            _patch_sigterm_broadcast(trainer)
            self.setup_optimizers(trainer)
        else:
            _sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _share_parameters(self) -> None:
        """Moves the module into the device's shared flat buffer and gives every device rank 0's values."""
        module = self._module()
        layout = checked_layout(self.config, module)  # again here: `configure_model` may have built the layers
        self._generation += 1
        self.buffer = SharedFlatBuffer.open(
            layout=layout,
            device=self.root_device,
            store=dist.distributed_c10d._get_default_store(),
            key=self._store_key(f"device{self.device_index}"),
            slot=self.device_slot,
            num_workers=self.workers_per_device,
            timeout=self.config.timeout,
        )
        bind_module(module, self.buffer.flat, layout, copy_values=self.is_device_leader)
        self._leader_ranks = list(range(0, self.world_size, self.workers_per_device))
        if len(self._leader_ranks) > 1:
            # a new group is a collective over the default group: every rank creates it, only leaders use it
            self.leader_backend = leader_backend(self.config.averaging_backend, self.parallel_devices or [])
            self._leader_group = dist.new_group(
                self._leader_ranks, timeout=self.config.timeout, backend=self.leader_backend
            )
            if self.is_device_leader:
                dist.broadcast(self.buffer.flat, src=0, group=self._leader_group)
        # the leader's copy and the broadcast are only queued on CUDA: done before any follower reads the buffer
        settle(self.root_device)
        self._at_consensus = False
        self._peers = PeerRegistry(
            dist.distributed_c10d._get_default_store(),
            self._store_key("liveness"),
            PeerRegistry.this_process(self.global_rank, self.device_index, self.device_slot),
            self.world_size,
        )
        self._peers.announce()
        self._stop_signal, self._stop_announced, self._failed, self._meetings = None, False, False, 0
        self.barrier("fedhog-shared")
        self._peers.load()
        log.debug("fedhog: rank %d shares %d elements on %s", self.global_rank, layout.numel, self.root_device)

    # ---------------------------------------------------------------------------------------- training hooks
    def _period(self, epoch: int) -> int:
        return averaging_period(
            epoch, period=self.config.averaging_period, warmup_epochs=self.config.averaging_warmup_epochs
        )

    @override
    def on_train_start(self) -> None:
        trainer = self._trainer()
        if self.buffer is not None and self._leader_group is not None and self.is_device_leader:
            self.engine = AveragingEngine(
                self.buffer.flat,
                self.buffer.device_steps,
                self._leader_group,
                self._leader_ranks,
                num_blocks=self.config.num_blocks,
                period=self._period(trainer.current_epoch),
                timeout=self.config.timeout,
                block_rule=self.config.block_rule,
                gossip_topology=self.config.topology if self.config.averaging == "gossip" else None,
                seed=self.config.seed,
                on_non_finite=self.config.nonfinite,
            )
            self.engine.start()
        self._stats_on = self.buffer is not None
        self._fit_start = self._interval_start = time.monotonic()
        if self.buffer is not None:
            self._check_equal_batches(trainer)
            self._install_stop_handler(trainer)
        if self.config.partial_backprop is not None and self.config.partition == "compute":
            self._positions, self._remove_position_hooks = record_positions(self.lightning_module)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._watch_peers()
        if self._at_consensus:
            self._leave_consensus()
        elif self._stop_signal is not None:
            self.consensus()  # agrees on the stop with every rank, saves a checkpoint there and raises
        with contextlib.suppress(Exception):  # a batch whose size Lightning cannot tell just is not counted
            self._samples += extract_batch_size(batch)
        if self.engine is not None:
            self._engine_call(self.engine.raise_if_failed, "average with the other devices")
            self.engine.period = self._period(self._trainer().current_epoch)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the user's ``training_step``; on a partial step only the worker's block requires gradients."""
        blocks = self._partial_step_blocks()
        if blocks is None:
            output = super().training_step(*args, **kwargs)
        else:
            trainer = self._trainer()
            block = owned_block(
                self.device_slot, trainer.current_epoch, self.workers_per_device, self.config.rotate_ownership
            )
            with gradients_only_for(self._partial_parameters, blocks[block]):
                output = super().training_step(*args, **kwargs)
        if self._remove_position_hooks is not None:  # the first forward measured the positions
            self._remove_position_hooks()
            self._remove_position_hooks = None
        return output

    def _partial_step_blocks(self) -> list[range] | None:
        """The partial-backprop blocks when this step is a partial one (odd worker steps from the start epoch)."""
        start = self.config.partial_backprop
        if start is None or self.buffer is None or self._remove_position_hooks is not None:
            return None
        trainer = self._trainer()
        if not trainer.training or trainer.current_epoch < start:
            return None
        if int(self.buffer.steps[self.device_slot]) % 2 == 0:
            return None
        if self._partial_blocks is None:  # computed once per fit: the parameters do not change during it
            self._partial_parameters = parameters = list(self._module().parameters())
            numels = [parameter.numel() for parameter in parameters]
            positions = [(self._positions or {}).get(id(parameter), 1) for parameter in parameters]
            costs = tensor_costs(numels, positions, self.config.partition)
            self._partial_blocks = partition_tensors(costs, self.workers_per_device)
        return self._partial_blocks

    def _module(self) -> pl.LightningModule:
        module = self.lightning_module
        if module is None:
            raise RuntimeError("fedhog: no LightningModule attached.")
        return module

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.buffer is not None:
            self.buffer.steps[self.device_slot] += 1
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

    # ----------------------------------------------------------------------------------------- work sharing
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """With ``work_sharing="dynamic"``, gives the training loader a sampler fed by the run's shared counter."""
        if self.config.work_sharing != "dynamic" or self.buffer is None:
            return dataloader
        trainer = self._trainer()
        if not trainer.training:
            return dataloader
        if not isinstance(dataloader, DataLoader) or dataloader.batch_size is None:
            rank_zero_warn(
                "fedhog: `work_sharing='dynamic'` needs a `DataLoader` with a `batch_size` (not a custom"
                " `batch_sampler`); this training loader keeps static shards."
            )
            return dataloader
        world_size = self.world_size
        limit = trainer.limit_train_batches
        total_chunks = None
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop.max_steps > 0:
            # max_steps is a per-worker count in Lightning; spend the same total work (max_steps batches per
            # worker) from one budget instead, so every worker stops at the same epoch end
            self._saved_max_steps = epoch_loop.max_steps
            total_chunks = max(epoch_loop.max_steps - trainer.global_step, 0) * world_size
            epoch_loop.max_steps = -1
        sampler = dataloader.sampler
        self.work_sampler = SharedCounterSampler(
            len(dataloader.dataset),  # type: ignore[arg-type]
            dataloader.batch_size,
            dist.distributed_c10d._get_default_store(),
            key=self._store_key("work"),
            seed=int(getattr(sampler, "seed", 0)),
            shuffle=bool(getattr(sampler, "shuffle", True)),
            chunks_per_epoch=limit * world_size if isinstance(limit, int) else None,
            total_chunks=total_chunks,
            start_epoch=trainer.current_epoch,
            on_exhausted=lambda: setattr(trainer, "should_stop", True),
        )
        return _update_dataloader(dataloader, self.work_sampler, mode=RunningStage.TRAINING)

    # ------------------------------------------------------------------------------------------- consensus
    def consensus(self) -> None:
        """Makes every device hold the exact average of all devices' copies, with every worker parked.

        A collective over all workers; Lightning calls it at the same points on every rank (validation start,
        checkpoint save, end of fit). Workers stay parked until the next training batch, so several consecutive
        consensus points (validate, then checkpoint) cost one.
        """
        if self.buffer is None or self._at_consensus:
            return
        began = time.monotonic()
        settle(self.root_device)  # this worker's last optimizer step has landed before the average is taken
        self._arrive()
        if self.engine is not None:
            self._engine_call(self.engine.pause, "pause the averaging with the other devices")
        stop = self._agree_or_fail("park the workers for a consensus point")
        if self.engine is not None:
            self._engine_call(self.engine.full_average, "average with the other devices at a consensus point")
        self._barrier_or_fail("finish the consensus average")
        self._at_consensus = True
        self._parked_seconds += time.monotonic() - began
        if stop:
            self._stop_at_consensus()
        if self._stats_on:
            self._log_stats()

    def _log_stats(self) -> None:
        """Gathers every worker's figures at a consensus point (a collective) and logs them from rank 0.

        Logged through the Trainer's loggers under ``fedhog/``: samples/s of the run, of each device and of
        each worker; seconds parked at consensus points; and per device leader the averaging figures of
        :meth:`~lightning_fedhog.engine.AveragingEngine.take_stats` (rounds/s, bytes/s, seconds per round, the
        distance a round moved the copy, block staleness in device steps, the distance to the mean measured
        at this consensus point).
        """
        now = time.monotonic()
        mine: dict[str, Any] = {
            "device": self.device_index,
            "samples_per_s": self._samples / max(now - self._interval_start, 1e-9),
            "parked_s": self._parked_seconds,
            "engine": self.engine.take_stats() if self.engine is not None else None,
        }
        self._samples, self._parked_seconds, self._interval_start = 0, 0.0, now
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        trainer = self._trainer()
        if not self.is_global_zero:
            return
        metrics = fedhog_metrics(gathered, wall_time=now - self._fit_start)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if "fedhog/rounds_per_s" in metrics:
            # the progress bar (rank 0's, one for the run) shows the averaging rate next to the user's metrics
            trainer._logger_connector._progress_bar_metrics["avg_rounds/s"] = round(metrics["fedhog/rounds_per_s"], 1)

    def _leave_consensus(self) -> None:
        # no worker may train while another still evaluates or saves the consensus model
        self._arrive()
        if self._agree_or_fail("resume training after a consensus point"):
            self._stop_at_consensus()
        if self.engine is not None and self.engine.parked:  # not parked: started after the consensus point
            self._engine_call(self.engine.resume, "resume the averaging with the other devices")
        self._at_consensus = False

    def _barrier_or_fail(self, what: str) -> None:
        try:
            self.barrier(what)
        except RuntimeError as error:
            raise self._lost(what, error) from error

    def _arrive(self) -> None:
        """Counts the consensus points met (the same sequence on every rank) and marks this one in the store.

        One store write per consensus point, so that a rank that times out there can name who never came.
        """
        self._meetings += 1
        if self._peers is not None:
            self._peers.arrive(self._meetings)

    def _agree_or_fail(self, what: str) -> bool:
        """A barrier that also agrees on stopping: True on every rank when any rank asked to stop (SIGTERM).

        Stopping is decided inside a collective that every rank reaches at the same consensus point, never by a
        separate message, so all ranks save the same checkpoint and stop at the same point.
        """
        flag = torch.tensor([0.0 if self._stop_signal is None else 1.0])  # the default group is gloo: CPU tensor
        try:
            dist.all_reduce(flag)
        except RuntimeError as error:
            raise self._lost(what, error) from error
        return bool(flag.item() > 0)

    def _lost(self, what: str, error: BaseException) -> PeerLostError:
        """The error of a collective that failed, naming the dead or failed peers this rank can find."""
        if self._peers is not None and "closed" in str(error).lower():
            # a killed peer's sockets close while its process is still exiting, before `/proc` shows it dead:
            # give it a moment, or it would be reported as alive but stuck
            deadline = time.monotonic() + _SETTLE_SECONDS
            while not self._peers.dead_local_peers() and time.monotonic() < deadline:
                time.sleep(0.05)
        diagnosis = self._peers.diagnose(self._meetings) if self._peers is not None else "no peer registry yet"
        return PeerLostError(
            f"fedhog: rank {self.global_rank} could not {what}: another worker of the {self.world_size} is gone or"
            f" did not arrive within `timeout={self.config.timeout}`: {diagnosis}. {_AFTER_FAILURE} ({error})"
        )

    def _engine_call(self, call: Callable[[], None], what: str) -> None:
        """Runs an averaging-engine command; a failure caused by a lost peer names that peer."""
        try:
            call()
        except RuntimeError as error:
            found = self._peers.dead_local_peers() if self._peers is not None else []
            if found or "non-finite" not in str(error):
                raise self._lost(what, error) from error
            raise

    def _watch_peers(self) -> None:
        """About once a second: stops if a same-host peer's process is gone; picks up a stop asked elsewhere.

        A ``stat`` per same-host peer and one store look-up; no thread and no collective, so a worker between
        consensus points learns of a dead peer within seconds instead of at the end of the epoch.
        """
        now = time.monotonic()
        if self._peers is None or now < self._next_liveness_check:
            return
        self._next_liveness_check = now + min(_LIVENESS_INTERVAL, self.config.timeout.total_seconds() / 4)
        dead = self._peers.dead_local_peers()
        if dead:
            raise PeerLostError(f"fedhog: rank {self.global_rank} stops: {self._peers.diagnose()}. {_AFTER_FAILURE}")
        key = self._store_key("stop")
        with contextlib.suppress(Exception):  # an unreachable store is caught by the next collective
            if self._stop_signal is not None and not self._stop_announced:
                self._peers.store.set(key, str(self.global_rank))
                self._stop_announced = True
            elif self._stop_signal is None and self._peers.store.check([key]):
                self._stop_signal = signal.SIGTERM  # another rank (maybe on another host) was asked to stop

    # ------------------------------------------------------------------------------------- stop on SIGTERM
    def _install_stop_handler(self, trainer: pl.Trainer) -> None:
        """Replaces Lightning's SIGTERM handler, which broadcasts on the default group from inside the handler.

        That broadcast only pairs with Lightning's per-step broadcast, which fedhog removes (see
        :func:`_patch_sigterm_broadcast`); from a signal handler it would block or pair with an unrelated
        collective. Here the handler only records the signal; the rank announces it in the store at its next batch
        and the other ranks pick it up within a second (:meth:`_watch_peers`), so a signal to one rank stops them
        all (a signal relayed to peers instead could reach one after ``fit`` restored the default handler). The
        stop itself is agreed at the next consensus point, which every rank enters at its next batch
        (:meth:`_stop_at_consensus`).
        """
        if threading_is_main():
            previous = trainer._signal_connector._original_handlers.get(signal.SIGTERM)

            def handler(signum: int, frame: FrameType | None) -> None:
                self._stop_signal = signum
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGTERM, handler)

    def _stop_at_consensus(self) -> NoReturn:
        """Every rank agreed to stop (SIGTERM): saves a resumable checkpoint of the consensus model and stops.

        The checkpoint goes where Lightning puts its SLURM-preemption checkpoints (``hpc_ckpt_N.ckpt`` in
        ``default_root_dir``; a SLURM requeue with ``ckpt_path=None`` resumes from it, elsewhere pass
        ``ckpt_path="hpc"``), and also to ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)``, so
        ``ckpt_path="last"`` resumes from it too. Then :class:`SIGTERMException` ends ``fit`` the way Lightning
        does on SIGTERM (a ``SystemExit``: the script ends with status 0 unless it catches it).
        """
        trainer = self._trainer()
        self._stop_signal = self._stop_signal or signal.SIGTERM
        path = self.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last is True:
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
        if self.is_global_zero:
            log.warning(
                "fedhog: stopped by SIGTERM at epoch %d, step %d; checkpoint saved to %s. Resume with"
                " `trainer.fit(..., ckpt_path=%r)` (or \"last\" with `ModelCheckpoint(save_last=True)`).",
                trainer.current_epoch, trainer.global_step, path, str(path),
            )
        raise SIGTERMException()

    def _check_equal_batches(self, trainer: pl.Trainer) -> None:
        """Refuses training data that gives workers different numbers of batches per epoch (they would hang).

        Consensus points come at epoch ends and every N batches; with static work sharing, they only line up
        when every worker has the same number of batches per epoch. One collective, once per ``fit``.
        """
        if self.config.work_sharing == "dynamic":
            return
        mine = trainer.num_training_batches
        counts: list[Any] = [None] * self.world_size
        dist.all_gather_object(counts, mine)
        if len(set(counts)) == 1 and counts[0] != float("inf"):
            return
        if all(count == float("inf") for count in counts):
            problem = "the training data has no length (an `IterableDataset`), so no worker knows where its epoch ends"
        else:
            problem = f"workers get different numbers of training batches per epoch: {dict(enumerate(counts))}"
        raise ValueError(
            f"fedhog: {problem}; workers would reach the consensus points (validation, checkpoints, end of epoch)"
            " at different times and wait for each other until `timeout`. HINT: give every worker the same number"
            " of batches: a map-style `Dataset` with Lightning's `DistributedSampler` (the default), or"
            " `Trainer(limit_train_batches=N)` with an int N that every worker's stream reaches, or"
            " `work_sharing='dynamic'`."
        )

    # --------------------------------------------------------------------------------------- reductions
    def _in_training_batch(self) -> bool:
        trainer = getattr(self.lightning_module, "_trainer", None)
        return (
            self.buffer is not None
            and trainer is not None
            and trainer.training
            and trainer._logger_connector._first_loop_iter is not None
        )

    @override
    def reduce(self, tensor: Tensor, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Tensor:
        """All-reduces ``tensor``, except inside a training batch, where the worker's own value is returned.

        A per-step ``self.log(..., sync_dist=True)`` would put every worker in lock-step (DESIGN.md section 6
        measured 111 vs 70 steps/s). Values logged per step are therefore the worker's own; values accumulated
        per epoch are still reduced over all workers when the epoch ends, outside the batch.
        """
        if isinstance(tensor, Tensor) and self._in_training_batch():
            if not self._warned_local_reduce:
                self._warned_local_reduce = True
                rank_zero_warn(
                    "fedhog: a value logged with `sync_dist=True` inside a training batch is reported for each worker"
                    " on its own, because syncing it every step would stall all workers. Epoch-level values"
                    " (`on_epoch=True`) are still reduced over all workers at the end of the epoch."
                )
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # decisions (early stopping, ...) must agree on all ranks: always reduce them for real
        total = _sync_ddp_if_available(
            torch.tensor(int(decision), device=self.root_device),
            None,
            reduce_op=ReduceOp.SUM,  # type: ignore[arg-type]
        )
        return bool(total == self.world_size) if all else bool(total)

    # -------------------------------------------------------------------------------------------- checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.consensus()
        return super().lightning_module_state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Adds every worker's optimizer state to the checkpoint, then lets rank 0 write it.

        Each Hogwild! worker has its own momentum; Lightning saves rank 0's only. All ranks call this method.
        """
        states = checkpoint.get("optimizer_states")
        if states is not None and self.world_size > 1 and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, apply_to_collection(states, Tensor, lambda t: t.detach().cpu()))
            checkpoint[CHECKPOINT_KEY] = {"world_size": self.world_size, "optimizer_states_per_rank": gathered}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restores this worker's own optimizer state when the checkpoint has one for every rank."""
        extra = checkpoint.get(CHECKPOINT_KEY) or {}
        per_rank = extra.get("optimizer_states_per_rank")
        states = checkpoint["optimizer_states"]
        if per_rank is not None and len(per_rank) == self.world_size:
            states = per_rank[self.global_rank]
        elif per_rank is not None:
            rank_zero_warn(
                f"fedhog: the checkpoint holds optimizer states of {len(per_rank)} workers but this run has"
                f" {self.world_size}; every worker starts from rank 0's optimizer state."
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, self.root_device)

    # ----------------------------------------------------------------------------------------------- teardown
    @override
    def on_exception(self, exception: BaseException) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self._peers is not None and not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self._failed = True  # peers quote this rank's reason instead of calling it "killed"
            caused = isinstance(exception, PeerLostError)
            self._peers.mark("failed", f"{type(exception).__name__}: {exception}", caused_by_peer=caused)
            if not caused and isinstance(exception, RuntimeError) and self._peers.dead_local_peers():
                log.error("fedhog: rank %d: %s. %s", self.global_rank, self._peers.diagnose(), _AFTER_FAILURE)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        if self._peers is not None and not self._failed:
            self._peers.mark("exited")
        self._peers = None
        clean = True  # destroying a group that a blocked thread still uses could hang
        if self.engine is not None:
            clean = self.engine.stop()
            self.engine = None
        module = self.lightning_module
        if self.buffer is not None and module is not None:
            unbind_module(module)
            trainer = getattr(module, "_trainer", None)
            if trainer is not None:
                _unpatch_sigterm_broadcast(trainer)
        self._release_buffer()
        if self._saved_max_steps is not None and module is not None and module._trainer is not None:
            module._trainer.fit_loop.epoch_loop.max_steps = self._saved_max_steps
        self._saved_max_steps = None
        self.work_sampler = None
        self._partial_blocks, self._partial_parameters = None, []  # a later fit may bring another model
        if self._leader_group is not None and clean:
            dist.destroy_process_group(self._leader_group)
        self._leader_group = None
        super().teardown()

    def _release_buffer(self) -> None:
        """Lets go of the device's shared vector; the leader's memory outlives every follower's use of it.

        On CUDA the followers map the leader's allocation through IPC: a leader that freed it, or exited, while a
        follower still copied its parameters out would leave that follower reading freed memory. Each follower
        finishes its copies and says so in the store; the leader waits for all of them (bounded, and not at all
        after a failure, when the run is ending anyway) before dropping its reference. Store counters, not a
        collective, so no rank's sequence of collectives changes.
        """
        buffer, self.buffer = self.buffer, None
        if buffer is None or self._failed or self.workers_per_device == 1 or not dist.is_initialized():
            return
        settle(self.root_device)
        store = dist.distributed_c10d._get_default_store()
        key = self._store_key(f"device{self.device_index}/released")
        if not self.is_device_leader:
            store.add(key, 1)
            return
        deadline = time.monotonic() + min(self.config.timeout.total_seconds(), _RELEASE_SECONDS)
        while (released := store.add(key, 0)) < self.workers_per_device - 1:
            if time.monotonic() > deadline:
                log.warning(
                    "fedhog: rank %d: only %d of the %d other workers of device %d let go of its shared parameters;"
                    " freeing them anyway.", self.global_rank, released, self.workers_per_device - 1,
                    self.device_index,
                )
                return
            time.sleep(0.005)

    def _trainer(self) -> pl.Trainer:
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is None:
            raise RuntimeError("fedhog: the LightningModule is not attached to a Trainer.")
        return trainer

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        presets: dict[str, tuple[str, dict[str, Any]]] = {
            "fedhog": ("fedhog: 2 Hogwild! workers per device, background all-reduce averaging every 16 steps", {}),
            "fedhog_k4": ("fedhog with the paper's 4 Hogwild! workers per device", {"workers_per_device": 4}),
            "fedhog_single_worker": (
                "fedhog with 1 worker per device: background averaging between devices only",
                {"workers_per_device": 1},
            ),
            "fedhog_lpp": (
                "LPP-SGD: 4 workers per device alternating full and partial-backprop steps from epoch 1",
                {"workers_per_device": 4, "partial_backprop": 1},
            ),
            "fedhog_gossip": (
                "fedhog with pairwise gossip on the one-peer exponential graph instead of all-reduce",
                {"averaging": "gossip", "topology": "exponential"},
            ),
        }
        for name, (description, init_params) in presets.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **init_params)


def restart_safe_store(environment: ClusterEnvironment, timeout: timedelta) -> dict[str, Any]:
    """The ``store=`` argument for ``init_process_group`` that lets a torchrun restart connect, or nothing.

    Under ``torchrun`` the ranks share the elastic agent's ``TCPStore`` (``TORCHELASTIC_USE_AGENT_STORE=True``),
    and the agent keeps that one store for every restart: with the default static rendezvous and, in torch 2.14,
    with ``--rdzv-backend=c10d`` too. ``init_process_group`` uses it without a per-attempt prefix, so the
    restarted ranks read the gloo addresses that the dead ranks of the previous attempt left there and fail or
    hang connecting to closed ports. That hits ``strategy="ddp"`` the same way; older torch releases prefixed the
    keys with the restart count, which is what this brings back, for the default group and every key derived
    from it (sub-groups, the shared buffer's keys).

    All agents count the same restarts when every node's workers fail together, which fedhog's failure
    detection ensures; ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` with the c10d rendezvous avoids the agent's
    store altogether (rank 0 then hosts a fresh store per attempt) and needs nothing from here.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    address, port = environment.main_address, environment.main_port
    if os.environ.get("MASTER_ADDR") != address or os.environ.get("MASTER_PORT") != str(port):
        return {}  # the environment points elsewhere than the agent's store: torch creates the store itself
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(address, port, is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"fedhog/attempt{attempt}", client)}


_AFTER_FAILURE = (
    "Nothing is saved after a failure, so the last checkpoint written (e.g. `last.ckpt`) is intact. HINT: find the"
    " cause in the failed rank's log, then resume with `trainer.fit(..., ckpt_path=\"last\")`, or launch with"
    " `torchrun --max-restarts=N` to restart automatically"
)


def _set_default_timeout(timeout: timedelta) -> None:
    """Sets the default group's collective timeout: ``dist.set_timeout`` from torch 2.12 on, before that the
    function it replaced (without either, collectives keep the start-up timeout)."""
    setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timeout)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


def _patch_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Replaces Lightning's per-step SIGTERM broadcast with a local check.

    Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every training batch
    (``_TrainingEpochLoop._broadcast_sigterm_tensor``), which puts all workers in lock-step (241 vs 435 steps/s
    in DESIGN.md section 6). Each worker receives the signal itself (the launcher forwards it to its children),
    so a local check keeps the behaviour without the collective.
    """
    epoch_loop = trainer.fit_loop.epoch_loop

    def _check_sigterm_locally() -> None:
        # fedhog's own handler (installed at train start) never sets `received_sigterm`; the stop is agreed at a
        # consensus point. A SIGTERM caught by Lightning's handler before that still ends this rank, locally.
        if trainer.received_sigterm:
            raise SIGTERMException()

    epoch_loop._broadcast_sigterm_tensor = _check_sigterm_locally  # type: ignore[method-assign]


def _unpatch_sigterm_broadcast(trainer: pl.Trainer) -> None:
    trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
