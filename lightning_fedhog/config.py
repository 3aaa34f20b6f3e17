"""The knobs of :class:`~lightning_fedhog.FedHogStrategy`, validated without any process running.

Every rule lives here as plain code so that a unit test can call it directly and a bad value fails at
``Trainer(...)`` construction, long before a worker process is spawned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args

from lightning_fedhog.blocks import BLOCK_RULES, BlockRule
from lightning_fedhog.compression import COMPRESSIONS, Compression
from lightning_fedhog.device_sync import AVERAGING_BACKENDS, AveragingBackend
from lightning_fedhog.partitions import PARTITIONS, Partition
from lightning_fedhog.topology import TOPOLOGIES, Topology

AveragingMode = Literal["allreduce", "gossip"]
"""How device leaders mix their copies: a global all-reduce (the paper's reference code) or pairwise gossip."""

_AVERAGING_MODES: tuple[str, ...] = get_args(AveragingMode)

WorkSharing = Literal["static", "dynamic", "auto"]
"""How the workers share an epoch's batches: Lightning's equal shards, a counter shared by the run, or static shards
until stragglers show."""

DEFAULT_AVERAGING_PERIOD = 16
"""The paper's H: device steps between two averaging rounds once the warm-up is over."""

DEFAULT_TIMEOUT = timedelta(minutes=30)
"""How long a collective may wait for a peer before the run fails naming it (Lightning's DDP default)."""

PRESETS: dict[str, tuple[str, dict[str, object]]] = {
    "fedhog": (
        "fedhog: Hogwild! workers per device chosen for the hardware, background all-reduce averaging every"
        f" {DEFAULT_AVERAGING_PERIOD} steps",
        {},
    ),
    "fedhog_k4": ("fedhog with the paper's 4 Hogwild! workers per device", {"workers_per_device": 4}),
    "fedhog_single_worker": (
        "fedhog with 1 worker per device: background averaging between devices only",
        {"workers_per_device": 1},
    ),
    "fedhog_lpp": (
        "LPP-SGD: workers per device chosen for the hardware (at least 2); full steps for the first 10% of the epochs,"
        " then full and partial-backprop steps alternate",
        {"partial_backprop": 0.1},
    ),
    "fedhog_gossip": (
        "fedhog with pairwise gossip on the one-peer exponential graph instead of all-reduce",
        {"averaging": "gossip", "topology": "exponential"},
    ),
}
"""``Trainer(strategy=name)``: the registered names, with their description and the knobs they set."""

MAX_WORKERS_PER_DEVICE = 64
"""K is bounded by the step counters next to the shared vector (one per worker)."""


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown `{name}={value!r}`. HINT: choose one of {', '.join(map(repr, choices))}.")


def _require_int(name: str, value: object, minimum: int, hint: str, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}). HINT: {hint}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}. HINT: {hint}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}. HINT: {hint}")


GPU_WORKERS_PER_DEVICE = 4
"""``"auto"``'s K on a GPU with enough CPU cores: the paper's K, which keeps a GPU busy between one worker's kernels
and the next (the one-GPU throughput benchmark in docs/benchmarks.md measures the others)."""


def auto_workers_per_device(device_type: str, devices: int, cpus: int, *, partial_backprop: bool) -> int:
    """``workers_per_device="auto"``: how many Hogwild! workers share each device, from the hardware.

    On a GPU the workers keep it busy between each other's kernels, data loading and Python overhead (the reason
    for K workers in the paper), up to :data:`GPU_WORKERS_PER_DEVICE`, and each needs a CPU core of its own to
    feed it. On CPU a "device" is the cores it is given: K workers split the same cores, so they add no compute,
    only asynchrony, and the stale reads of more workers cost accuracy per step (docs/benchmarks.md has the CPU runs).
    Partial backprop splits the model among the workers, so it gets at least 2.

    Args:
        device_type: ``torch.device.type`` of the devices (``"cuda"``, ``"cpu"``, ...).
        devices: devices on this node.
        cpus: CPU cores this process may run on.
        partial_backprop: whether LPP-SGD is on.
    """
    workers = 1
    if device_type == "cuda":
        workers = max(1, min(GPU_WORKERS_PER_DEVICE, cpus // max(devices, 1)))
    return max(workers, 2) if partial_backprop else workers


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one, e.g. under SLURM)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def external_workers_per_device(processes: int, devices: int, num_nodes: int) -> int:
    """K under a launcher that started the processes itself (torchrun, SLURM): its processes per device.

    Raises:
        ValueError: the processes cannot be split evenly over the devices.
    """
    per_run = devices * num_nodes
    if processes < per_run or processes % per_run:
        raise ValueError(
            f"fedhog: the launcher started {processes} processes for {devices} device(s) x {num_nodes} node(s), which"
            " is not a whole number of workers per device. HINT: start `devices x workers_per_device` processes per"
            " node (e.g. `torchrun --nproc-per-node`, `--ntasks-per-node`), or set `workers_per_device` explicitly."
        )
    return processes // per_run


def averaging_period(epoch: int, *, period: int | Literal["auto"], warmup_epochs: int) -> int | Literal["auto"]:
    """Device steps between two rounds in ``epoch``: one during the warm-up epochs, ``period`` after.

    The paper (Sec. V, "pre_post_epochs") averages after every step while the learning rate is high and
    relaxes to every H steps afterwards. A leader only changes its own pace with this; the sequence of rounds
    and blocks stays the same on every leader, so leaders in different epochs still agree.
    """
    return 1 if epoch < warmup_epochs else period


@dataclass(frozen=True, kw_only=True)
class FedHogConfig:
    """Validated settings of one fedhog run; each field says what it does and when to change it."""

    workers_per_device: int | Literal["auto"] = "auto"
    """K, the number of Hogwild! worker processes that share one parameter copy per device (LAP-SGD, Chatterjee et al.,
    ICDCS 2024). ``"auto"`` (the default) chooses it from the hardware once the Trainer has set the devices
    (:func:`auto_workers_per_device`; under torchrun or SLURM, the processes the launcher started per device).
    """

    averaging: AveragingMode = "allreduce"
    """How devices mix their copies in the background. ``"allreduce"``: every round, all device leaders average one
    block of the flat parameter vector. ``"gossip"``: every round, each leader averages the block with one peer
    chosen by ``topology``; less traffic per round, slower mixing.
    """

    averaging_period: int | Literal["auto"] = DEFAULT_AVERAGING_PERIOD
    """Device steps (optimizer steps summed over the K workers of a device) between two averaging rounds once the
    warm-up is over. The paper's H, 8 to 16. ``"auto"`` chooses it while training, as often as averaging can run
    while costing the workers about 5% of their throughput (the workers' step rate over everything against short
    stretches with no round in flight); it follows the link and the step time as they change, and is logged as
    ``fedhog/period``. Use it on a thin or shared link, or when you do not know the right H.
    """

    averaging_warmup_epochs: int = 0
    """During the first this-many epochs a round starts after every device step (the paper's ``pre_post_epochs``, about
    half of training in its recipes), so copies stay close while the learning rate is large.
    """

    num_blocks: int = 1
    """The flat vector is cut into this many contiguous blocks and one block is exchanged per round, round-robin, so a
    round moves ``1/num_blocks`` of the model.
    """

    timeout: timedelta = DEFAULT_TIMEOUT
    """How long a collective (averaging round, consensus barrier) may wait for a peer before the run fails with an
    error naming the peers.
    """

    topology: Topology = "exponential"
    """Gossip peer schedule: ``"exponential"`` (hypercube one-peer exponential graph), ``"ring"``, ``"random"``
    (matchings from ``seed``). Ignored by ``"allreduce"``.
    """

    block_rule: BlockRule = "round_robin"
    """Which block a round exchanges when ``num_blocks > 1``: ``"round_robin"``, ``"random"`` (from ``seed``),
    ``"largest_change"`` (where the copies moved most since that block's last exchange).
    """

    seed: int = 0
    """Shared by all leaders for the random topology and block rule."""

    partial_backprop: int | float | None = None
    """None (off), or when each worker starts alternating full steps with partial steps that compute gradients only for
    its own block of parameter tensors (LPP-SGD): an epoch number (a whole number, also written as a float), or a
    value strictly between 0 and 1, the share of ``max_epochs`` trained with full steps first (the paper's schedule
    is 0.1, the ``"fedhog_lpp"`` preset's). Needs ``workers_per_device >= 2``.
    """

    partition: Partition = "numel"
    """How parameter tensors are split into the K partial-backprop blocks: ``"numel"`` (the paper's equal element
    counts) or ``"compute"`` (equal estimated gradient work, measured on the first batch: early convolutions apply
    few weights at many positions).
    """

    rotate_ownership: bool = False
    """Move every worker to the next block each epoch, so each worker trains every block."""

    work_sharing: WorkSharing = "auto"
    """``"static"``: Lightning's equal shards (reproducible; every worker takes the same number of steps).
    ``"dynamic"``: every worker claims the epoch's batches one at a time from a counter shared by the run, so faster
    workers take more batches and nobody idles at the epoch end behind a straggler; validation and checkpoints must
    then happen at epoch ends. ``"auto"`` (the default): static until an epoch end measures the fastest device
    idling 25% or more of the slowest one's training time, then dynamic from the next epoch on, on every worker at
    once (where the run's settings allow it; otherwise static, with one message that says why). Checkpoints record
    the switch and a resumed run keeps it.
    """

    nonfinite: Literal["stop", "skip"] = "stop"
    """An averaging round in which a device's block holds NaN/Inf is never applied, so the values do not spread to
    healthy devices. ``"stop"`` then ends the run with an error naming the device; ``"skip"`` carries on (the next
    consensus point still stops: a consensus of non-finite copies cannot be formed).
    """

    averaging_backend: AveragingBackend = "auto"
    """How device leaders talk. ``"auto"``: NCCL when every device has a GPU of its own, gloo on CPU and wherever a GPU
    hosts several devices (NCCL refuses two ranks on one GPU; gloo averages CUDA tensors through host memory).
    ``"gloo"`` forces gloo (MIG slices, a broken NCCL); ``"nccl"`` refuses to start where NCCL cannot run.
    """

    compression: Compression = "auto"
    """What a background all-reduce round sends. ``"auto"`` (the default): fp32 until the rounds show that they keep
    the link busy (more than a quarter of their period's steps, two rounds in a row); then int8, kept only if int8
    rounds are clearly faster (else the limit was the computation: back to fp32, trying again ever more rarely), and
    back to fp32 when fp32 rounds would take under an eighth of the period. Every device agrees on each switch
    inside the rounds' messages; each switch is one info line, and ``fedhog/compression`` logs the share of rounds
    that sent int8. ``"none"``: always fp32. ``"bf16"`` and ``"int8"`` (plus one scale per 1024 elements): always
    compressed. Compressed rounds send each copy's difference from the last average of that block, which every
    device holds (one more fp32 copy of the vector per device, allocated when the first round compresses), so the
    mean of the copies is still preserved and what quantisation drops goes out with the next round of that block.
    Consensus points send what the rounds send: while rounds compress, validation and checkpoints get the model every
    device agreed on from compressed differences (the same bits everywhere, within quantisation error of the exact
    average; what quantisation drops stays in each copy, so nothing is lost), and the end of ``fit`` the exact
    average (while a compressed consensus holds, each device keeps its residual aside: one more fp32 copy of the
    vector). ``"none"`` keeps every consensus point an exact fp32 average. The rounds become all-gathers, whose
    bytes per device grow with the number of devices: against an fp32 all-reduce, int8 sends a quarter with 2
    devices and less up to 7, bf16 half with 2 devices and less up to 3. Gossip rounds always send fp32 (``"auto"``
    is then fp32; a fixed codec is refused).
    """

    rounds_in_flight: int = 1
    """Background rounds started before the oldest one is finished. A round whose time goes to waiting (a link with
    latency: each all-reduce needs round trips) leaves the link idle; with 2 or more, the next block is on its way
    meanwhile, so blocks are mixed up to that many times as often. It needs `averaging="allreduce"`,
    `block_rule="round_robin"` and `num_blocks` >= this (the blocks in flight are distinct). A consensus point then
    waits for the rounds already started. On a link whose bandwidth is the limit it changes nothing: the rounds
    share the bytes. Between GPUs with NCCL the collectives of one group run one after the other, so rounds queue
    rather than overlap; the overlap is gloo's (CPU devices, several devices on one GPU).
    """

    def __post_init__(self) -> None:
        if self.workers_per_device != "auto":
            _require_int(
                "workers_per_device",
                self.workers_per_device,
                1,
                "use 1 for one process per device (no local asynchrony), 2-4 for Hogwild! workers sharing a device,"
                " or 'auto' to choose from the hardware.",
                maximum=MAX_WORKERS_PER_DEVICE,
            )
        _require_choice("averaging", self.averaging, _AVERAGING_MODES)
        _require_choice("topology", self.topology, TOPOLOGIES)
        _require_choice("block_rule", self.block_rule, BLOCK_RULES)
        _require_choice("partition", self.partition, PARTITIONS)
        _require_choice("work_sharing", self.work_sharing, get_args(WorkSharing))
        _require_choice("nonfinite", self.nonfinite, ("stop", "skip"))
        _require_choice("averaging_backend", self.averaging_backend, AVERAGING_BACKENDS)
        _require_choice("compression", self.compression, COMPRESSIONS)
        if self.compression not in ("none", "auto") and self.averaging != "allreduce":
            raise ValueError(
                f"`compression={self.compression!r}` compresses all-reduce rounds (every device shares the reference"
                f" the differences are taken from), but `averaging={self.averaging!r}`. HINT: use"
                " `averaging='allreduce'` with compression, or `compression='auto'` (fp32 with gossip)."
            )
        _require_int("seed", self.seed, 0, "any non-negative integer; all leaders must use the same one.")
        if isinstance(self.partial_backprop, float) and self.partial_backprop.is_integer():
            # a command line or YAML parser may hand over `10` as 10.0: a whole number is an epoch number
            object.__setattr__(self, "partial_backprop", int(self.partial_backprop))
        if isinstance(self.partial_backprop, float):
            if not 0 < self.partial_backprop < 1:
                raise ValueError(
                    f"`partial_backprop={self.partial_backprop}` is neither an epoch number nor a share of the run's"
                    " epochs before partial steps start (strictly between 0 and 1). HINT: e.g. 0.1 (the paper's"
                    " schedule), or a whole epoch number such as 0 (from the start)."
                )
        elif self.partial_backprop is not None:
            _require_int(
                "partial_backprop",
                self.partial_backprop,
                0,
                "the epoch from which partial steps start (0: from the start), a share of the epochs such as 0.1,"
                " or None to turn it off.",
            )
        if self.partial_backprop is not None and self.workers_per_device != "auto" and self.workers_per_device < 2:
            raise ValueError(
                f"`partial_backprop={self.partial_backprop}` splits the model among the workers of a device, but"
                " `workers_per_device=1`. HINT: use `workers_per_device` >= 2, or `partial_backprop=None`."
            )
        if self.averaging_period != "auto":
            _require_int(
                "averaging_period",
                self.averaging_period,
                1,
                "it counts device steps between averaging rounds; the paper uses 8-16, or 'auto' to choose it.",
            )
        _require_int(
            "averaging_warmup_epochs",
            self.averaging_warmup_epochs,
            0,
            "use 0 to average every `averaging_period` steps from the start.",
        )
        _require_int("num_blocks", self.num_blocks, 1, "use 1 to exchange the whole vector every round.")
        _require_int("rounds_in_flight", self.rounds_in_flight, 1, "use 1 for one background round at a time.")
        if self.rounds_in_flight > 1:
            needs = {"averaging": (self.averaging, "allreduce"), "block_rule": (self.block_rule, "round_robin")}
            for name, (value, wanted) in needs.items():
                if value != wanted:
                    raise ValueError(
                        f"`rounds_in_flight={self.rounds_in_flight}` overlaps all-reduce rounds of distinct blocks,"
                        f" but `{name}={value!r}`. HINT: use `{name}={wanted!r}`, or `rounds_in_flight=1`."
                    )
            if self.num_blocks < self.rounds_in_flight:
                raise ValueError(
                    f"`rounds_in_flight={self.rounds_in_flight}` needs as many distinct blocks in flight, but"
                    f" `num_blocks={self.num_blocks}`. HINT: use `num_blocks={self.rounds_in_flight}` or more."
                )
        if not isinstance(self.timeout, timedelta) or self.timeout <= timedelta(0):
            raise ValueError(
                f"`timeout` must be a positive `datetime.timedelta`, got {self.timeout!r}."
                " HINT: e.g. `timeout=timedelta(minutes=10)`."
            )

    def period_at(self, epoch: int) -> int | Literal["auto"]:
        """The averaging period in ``epoch`` (:func:`averaging_period`)."""
        return averaging_period(epoch, period=self.averaging_period, warmup_epochs=self.averaging_warmup_epochs)

    def validate_model(self, numel: int, num_parameter_tensors: int) -> None:
        """Checks the settings that depend on the model's size.

        Args:
            numel: number of elements of the flat vector (floating parameters and buffers).
            num_parameter_tensors: parameter tensors the partial-backprop partition splits.
        """
        workers = self.workers_per_device  # "auto" is chosen before the launcher checks the model
        if self.partial_backprop is not None and workers != "auto" and 0 < num_parameter_tensors < workers:
            raise ValueError(
                f"`partial_backprop` gives each of the {self.workers_per_device} workers of a device a block of"
                f" parameter tensors, but the model has only {num_parameter_tensors}. HINT: use `workers_per_device`"
                f" <= {num_parameter_tensors}, or `partial_backprop=None`."
            )
        if numel > 0 and self.num_blocks > numel:
            raise ValueError(
                f"`num_blocks={self.num_blocks}` is larger than the model's {numel} floating elements."
                f" HINT: use `num_blocks` <= {numel}."
            )
