"""Bad configuration fails at construction or at `fit`, before any worker process is spawned."""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import pytest
import torch
from torch import nn

import lightning_fedhog  # noqa: F401 - registers the strategies
from lightning_fedhog import FedHogConfig, FedHogStrategy
from lightning_fedhog.device_sync import leader_backend
from tests.conftest import fit_refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers_per_device": 0}, r"`workers_per_device` must be >= 1, got 0. HINT"),
        ({"workers_per_device": 1.5}, r"`workers_per_device` must be an integer"),
        ({"workers_per_device": True}, r"`workers_per_device` must be an integer"),
        # a typo would start 100 processes per device before anything failed: refused at construction instead
        ({"workers_per_device": 100}, r"`workers_per_device` must be <= 64, got 100. HINT"),
        ({"workers_per_device": "many"}, r"`workers_per_device` must be an integer, got 'many' .* or 'auto'"),
        ({"num_blocks": 0}, r"`num_blocks` must be >= 1, got 0"),
        ({"averaging_period": -3}, r"`averaging_period` must be >= 1, got -3"),
        ({"averaging_warmup_epochs": -1}, r"`averaging_warmup_epochs` must be >= 0, got -1"),
        ({"averaging": "gossipy"}, r"Unknown `averaging='gossipy'`. HINT: choose one of 'allreduce', 'gossip'"),
        ({"timeout": timedelta(0)}, r"`timeout` must be a positive `datetime.timedelta`"),
        ({"timeout": 30}, r"`timeout` must be a positive `datetime.timedelta`"),
        ({"topology": "star"}, r"Unknown `topology='star'`. HINT: choose one of 'exponential', 'ring', 'random'"),
        ({"block_rule": "lifo"}, r"Unknown `block_rule='lifo'`. HINT: choose one of 'round_robin'"),
        ({"partition": "flops"}, r"Unknown `partition='flops'`. HINT: choose one of 'numel', 'compute'"),
        ({"nonfinite": "ignore"}, r"Unknown `nonfinite='ignore'`. HINT: choose one of 'stop', 'skip'"),
        ({"work_sharing": "greedy"}, r"Unknown `work_sharing='greedy'`. HINT: choose one of 'static', 'dynamic'"),
        ({"averaging_backend": "mpi"}, r"Unknown `averaging_backend='mpi'`. HINT: choose one of 'auto', 'nccl'"),
        ({"partial_backprop": -1, "workers_per_device": 2}, r"`partial_backprop` must be >= 0, got -1"),
        ({"partial_backprop": 3, "workers_per_device": 1}, r"`workers_per_device=1`. HINT: use `workers_per_device`"),
        ({"partial_backprop": 0.1, "workers_per_device": 1}, r"`workers_per_device=1`. HINT: use `workers_per_device`"),
        ({"partial_backprop": 1.5}, r"`partial_backprop=1.5` is neither .* between 0 and 1\). HINT: e.g. 0.1"),
        ({"partial_backprop": -0.5}, r"`partial_backprop=-0.5` is neither .* HINT: .* such as 0 \(from the start\)"),
        ({"rounds_in_flight": 0}, r"`rounds_in_flight` must be >= 1, got 0"),
        ({"rounds_in_flight": 2}, r"`rounds_in_flight=2` needs .* `num_blocks=1`. HINT: use `num_blocks=2` or more"),
        ({"rounds_in_flight": 2, "num_blocks": 2, "averaging": "gossip"}, r"`averaging='gossip'`. HINT: use `averag"),
        ({"rounds_in_flight": 2, "num_blocks": 2, "block_rule": "random"}, r"HINT: use `block_rule='round_robin'`"),
    ],
)
def test_bad_knobs_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedHogConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        FedHogStrategy(**kwargs)


def test_num_blocks_larger_than_the_model_is_refused() -> None:
    FedHogConfig(num_blocks=10).validate_model(10, 2)
    with pytest.raises(ValueError, match=r"`num_blocks=11` is larger than the model's 10 floating elements"):
        FedHogConfig(num_blocks=11).validate_model(10, 2)


def test_partial_backprop_as_a_whole_float_is_an_epoch_number() -> None:
    # LightningCLI hands `--trainer.strategy.partial_backprop=10` over as 10.0
    assert FedHogConfig(partial_backprop=10.0).partial_backprop == 10
    assert isinstance(FedHogConfig(partial_backprop=0.0).partial_backprop, int)
    assert FedHogConfig(partial_backprop=0.1).partial_backprop == 0.1


def test_partial_backprop_needs_a_block_of_tensors_per_worker() -> None:
    FedHogConfig(workers_per_device=2, partial_backprop=0).validate_model(10, 2)
    with pytest.raises(ValueError, match=r"gives each of the 4 workers .* only 3. HINT: use `workers_per_device` <= 3"):
        FedHogConfig(workers_per_device=4, partial_backprop=0).validate_model(10, 3)


class _Tiny(L.LightningModule):
    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        if mixed:
            self.other = nn.Linear(2, 2).double()

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_checks_run_in_the_launcher_before_spawning() -> None:
    fit_refused(_Tiny(), r"`num_blocks=7` is larger than the model's 6 floating", FedHogStrategy(num_blocks=7))
    fit_refused(_Tiny(mixed=True), r"mixes dtypes .*torch.float32.*HINT: cast the module")


def test_partial_steps_after_a_share_of_the_run_need_max_epochs() -> None:
    fit_refused(  # `max_steps` alone leaves `max_epochs` unset
        _Tiny(), r"`partial_backprop=0.1` starts .* no `max_epochs` \(got None\). HINT: set `Trainer\(max_epochs=",
        FedHogStrategy(partial_backprop=0.1),
    )


def test_sync_batchnorm_is_refused_at_trainer_construction() -> None:
    with pytest.raises(ValueError, match=r"sync_batchnorm=True\)` is not supported by fedhog.*HINT: drop"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fedhog", sync_batchnorm=True)


def test_unsupported_accelerator_is_refused_with_the_alternative() -> None:
    strategy = FedHogStrategy()
    strategy.accelerator = L.pytorch.accelerators.MPSAccelerator()
    with pytest.raises(ValueError, match=r"not MPSAccelerator. HINT: use `strategy='ddp'`"):
        strategy._configure_launcher()


def test_leaders_use_nccl_only_between_distinct_gpus() -> None:
    cuda = [torch.device("cuda", 0), torch.device("cuda", 1)]
    same_gpu = [torch.device("cuda", 0)] * 2
    cpu = [torch.device("cpu")] * 2
    assert leader_backend("auto", cuda) == "nccl"
    assert leader_backend("auto", same_gpu) == "gloo"  # NCCL refuses two ranks on one GPU
    assert leader_backend("auto", cpu) == "gloo"
    assert leader_backend("gloo", cuda) == "gloo"
    assert leader_backend("nccl", cuda) == "nccl"
    with pytest.raises(ValueError, match=r"cuda:0 hosts several devices.*HINT: use `averaging_backend='auto'`"):
        leader_backend("nccl", same_gpu)
    with pytest.raises(ValueError, match=r"'nccl'` needs CUDA devices.*HINT"):
        leader_backend("nccl", cpu)


def test_nccl_on_cpu_is_refused_at_trainer_construction() -> None:
    with pytest.raises(ValueError, match=r"`averaging_backend='nccl'` needs CUDA devices"):
        L.Trainer(accelerator="cpu", devices=2, strategy=FedHogStrategy(averaging_backend="nccl"), logger=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FedHogStrategy(), logger=False)
    assert trainer.strategy.leader_backend == "gloo"


def test_registered_names_build_the_strategy_with_their_presets() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="fedhog_k4", logger=False)
    assert isinstance(trainer.strategy, FedHogStrategy)
    assert trainer.strategy.workers_per_device == 4
    assert trainer.strategy.num_processes == 8
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 8, "rank": 0}
    single = L.Trainer(accelerator="cpu", devices=3, strategy="fedhog_single_worker", logger=False)
    assert single.strategy.num_processes == 3
    lpp = L.Trainer(accelerator="cpu", devices=2, strategy="fedhog_lpp", logger=False)
    # the paper's tenth of the epochs with full steps; K from the hardware, at least 2 (one block each)
    assert (lpp.strategy.workers_per_device, lpp.strategy.config.partial_backprop) == (2, 0.1)


def test_auto_workers_fit_the_hardware() -> None:
    from lightning_fedhog.config import auto_workers_per_device, external_workers_per_device

    assert auto_workers_per_device("cpu", 2, 2, partial_backprop=False) == 1  # K workers would split the same cores
    assert auto_workers_per_device("cpu", 2, 64, partial_backprop=False) == 1
    assert auto_workers_per_device("cpu", 2, 2, partial_backprop=True) == 2  # one block each: at least 2
    assert auto_workers_per_device("cuda", 1, 16, partial_backprop=False) == 4  # the paper's K per GPU
    assert auto_workers_per_device("cuda", 8, 16, partial_backprop=False) == 2  # a core per worker
    assert auto_workers_per_device("cuda", 4, 2, partial_backprop=False) == 1
    assert auto_workers_per_device("cuda", 4, 2, partial_backprop=True) == 2
    assert external_workers_per_device(8, 2, 1) == 4
    assert external_workers_per_device(8, 2, 2) == 2
    for processes, devices in ((6, 4), (2, 4)):
        with pytest.raises(ValueError, match=rf"started {processes} processes for {devices} device.* HINT: start"):
            external_workers_per_device(processes, devices, 1)


def test_auto_workers_on_cpu_is_one_per_device_and_an_external_launcher_decides_its_own(monkeypatch) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="fedhog", logger=False)
    assert (trainer.strategy.workers_per_device, trainer.strategy.num_processes, trainer.world_size) == (1, 2, 2)
    assert trainer.strategy.config.workers_per_device == 1, "the config holds the chosen number"
    explicit = L.Trainer(accelerator="cpu", devices=2, strategy=FedHogStrategy(workers_per_device=3), logger=False)
    assert explicit.strategy.num_processes == 6
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun, or a worker fedhog's launcher started: 4 processes, 2 devices
    monkeypatch.setenv("WORLD_SIZE", "4")
    launched = L.Trainer(accelerator="cpu", devices=2, strategy="fedhog", logger=False)
    assert (launched.strategy.workers_per_device, launched.world_size) == (2, 4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"started 3 processes for 2 device\(s\) x 1 node\(s\).* HINT: start"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fedhog", logger=False)


def test_workers_map_to_their_device() -> None:
    strategy = FedHogStrategy(workers_per_device=3)
    strategy.parallel_devices = [torch.device("cpu", 0), torch.device("cpu", 1)]
    seen = []
    for local_rank in range(6):
        strategy.cluster_environment = _FixedRank(local_rank)
        strategy.set_world_ranks()  # as Lightning does once it has set the environment
        seen.append((strategy.root_device.index, strategy.placement.slot, strategy.placement.is_leader))
    assert seen == [(0, 0, True), (0, 1, False), (0, 2, False), (1, 0, True), (1, 1, False), (1, 2, False)]


class _FixedRank(L.fabric.plugins.environments.LightningEnvironment):
    def __init__(self, local_rank: int) -> None:
        super().__init__()
        self._local = local_rank

    def local_rank(self) -> int:
        return self._local


def test_settings_that_bring_back_per_step_lockstep_are_warned_about() -> None:
    from datetime import timedelta as td

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_fedhog.checks import lockstep_hazards

    clean = L.Trainer(accelerator="cpu", devices=2, strategy="fedhog", logger=False)
    assert lockstep_hazards(clean) == []
    hazardous = L.Trainer(
        accelerator="cpu", devices=2, strategy="fedhog", logger=False, max_time="00:00:10:00",
        callbacks=[ModelCheckpoint(train_time_interval=td(minutes=5))],
    )
    messages = lockstep_hazards(hazardous)
    assert len(messages) == 2
    assert "max_time" in messages[0] and "HINT: bound the run with `max_epochs`" in messages[0]
    assert "train_time_interval" in messages[1] and "HINT" in messages[1]


def test_the_strategy_signature_and_the_config_are_one_list_of_knobs() -> None:
    """Every knob appears once in each, in the same order, with the same type and default (they cannot drift)."""
    import ast
    import dataclasses
    import inspect
    import itertools
    import textwrap

    fields = [(f.name, str(f.type), f.default) for f in dataclasses.fields(FedHogConfig)]
    lightning_args = {"self", "accelerator", "parallel_devices", "cluster_environment", "checkpoint_io",
                      "precision_plugin"}
    parameters = [
        (p.name, str(p.annotation), p.default)
        for p in inspect.signature(FedHogStrategy.__init__).parameters.values()
        if p.name not in lightning_args
    ]
    assert parameters == fields
    body = ast.parse(textwrap.dedent(inspect.getsource(FedHogConfig))).body[0].body  # type: ignore[attr-defined]
    documented = [
        node.target.id for node, after in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
    ]
    assert documented == [name for name, _, _ in fields], "every knob has its docstring right under the field"
    built = FedHogStrategy(**{name: default for name, _, default in fields})
    assert built.config == FedHogConfig()
