"""Checks that refuse what fedhog cannot run, as early as possible: most before any worker process exists.

Every rule is a plain function of the module, the Trainer's settings or a few numbers, so a unit test calls it
directly. The launcher runs :func:`check_before_launch` in the launching process; :func:`check_equal_batches` needs
every worker's batch count and runs once per ``fit`` at the start of training.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.nn import Module
from torch.nn.parameter import is_lazy
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_fedhog import internals
from lightning_fedhog.config import FedHogConfig
from lightning_fedhog.internals import saves_by_time, step_or_time_trigger, time_based_val_check
from lightning_fedhog.partial import first_partial_epoch
from lightning_fedhog.shared_buffer import FlatLayout, flat_layout

if TYPE_CHECKING:
    import lightning.pytorch as pl


def check_before_launch(trainer: pl.Trainer, config: FedHogConfig) -> None:
    """Every check that can run before a worker exists: the model, then Trainer settings; warnings last."""
    module = trainer.lightning_module
    if module is not None and trainer.state.fn == TrainerFn.FITTING:
        checked_layout(config, module, built=not is_overridden("configure_model", module))
    check_no_time_based_validation(trainer)
    if config.partial_backprop is not None:
        first_partial_epoch(config.partial_backprop, trainer.max_epochs)  # a share needs `max_epochs`
    if config.work_sharing == "dynamic" and (blocker := settings_blocking_dynamic_sharing(trainer)) is not None:
        raise ValueError(f"`work_sharing='dynamic'`: {blocker}")
    for message in lockstep_hazards(trainer):
        rank_zero_warn(message)


def settings_blocking_dynamic_sharing(trainer: pl.Trainer) -> str | None:
    """Why the Trainer's settings (and the module's ``training_step``) rule dynamic sharing out, or None."""
    module = trainer.lightning_module
    step_based = [
        f"{type(callback).__name__}({trigger})"
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and (trigger := step_or_time_trigger(callback))
    ]
    takes_iterator = module is not None and is_param_in_hook_signature(
        module.training_step, "dataloader_iter", explicit=True
    )
    return dynamic_blocker(
        trainer.val_check_interval, step_based, max_time=has_timer(trainer), min_steps=trainer.min_steps,
        dataloader_iter=takes_iterator,
    )


def checked_layout(config: FedHogConfig, module: Module, *, built: bool = True) -> FlatLayout:
    """The module's flat layout, after every model-dependent check of ``config`` (dtypes, blocks, tensors).

    Args:
        built: the module has its layers. False in the launcher when the module builds them in
            ``configure_model`` (in each worker, after the launch): then a module with no parameters yet is fine.
    """
    lazy = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if is_lazy(tensor)]
    if lazy:
        raise ValueError(
            f"fedhog shares every parameter in one flat vector sized before training, but {type(module).__name__}"
            f" has lazy parameters or buffers whose shape is not known yet: {lazy}. HINT: run one forward pass with"
            " a batch of the right shape at the end of `__init__` (or `configure_model`) so the lazy layers"
            " initialise (DDP asks the same), or give the layers their input sizes (e.g. `nn.Linear(in, out)`)."
        )
    parameters = list(module.parameters())
    integral = [name for name, parameter in module.named_parameters() if not parameter.is_floating_point()]
    if integral:
        raise ValueError(
            f"fedhog shares and averages floating parameters only, but {type(module).__name__} has non-floating"
            f" parameter(s) {integral}: each worker would keep its own copy and the devices would silently disagree."
            " HINT: make them floating, or register them with `register_buffer` (state each worker keeps as is)."
        )
    if built and not parameters:
        raise ValueError(
            f"fedhog trains a module's parameters, but {type(module).__name__} has none. HINT: create the layers in"
            " `__init__` or `configure_model`, or run a module without parameters with `Trainer(strategy='auto')`."
        )
    layout = flat_layout(module)
    config.validate_model(layout.num_elements, len(parameters))
    return layout


def lockstep_hazards(trainer: pl.Trainer) -> list[str]:
    """Trainer settings that put all workers back in lock-step every step, with the cost and the alternative.

    fedhog's benefit comes from workers never waiting for each other between consensus points; a collective after
    every step makes every worker wait for the slowest one each step.
    """
    messages = []
    if has_timer(trainer):
        messages.append(
            "fedhog: `Trainer(max_time=...)` (the `Timer` callback) broadcasts the elapsed time from rank 0 after every"
            " step, so every worker waits for the slowest each step. HINT: bound the run with `max_epochs` or"
            " `max_steps` instead."
        )
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and saves_by_time(callback):
            messages.append(
                "fedhog: `ModelCheckpoint(train_time_interval=...)` decides with a broadcast after every step, so"
                " every worker waits for the slowest each step. HINT: use `every_n_epochs` (or `every_n_train_steps`"
                " with static work sharing)."
            )
    return messages


def has_timer(trainer: pl.Trainer) -> bool:
    """Whether the Trainer has a ``Timer`` callback (``max_time=...``), which broadcasts after every step."""
    return any(isinstance(callback, Timer) for callback in trainer.callbacks)


def check_no_time_based_validation(trainer: pl.Trainer) -> None:
    """Refuses a time-based ``val_check_interval``: each worker decides it by its own clock, so workers would
    disagree on when to validate and wait for each other at the consensus point until ``timeout``.
    """
    interval = time_based_val_check(trainer)
    if interval is not None:
        raise ValueError(
            f"fedhog: a time-based `val_check_interval` ({interval} s) is decided by each worker's own clock, so"
            " workers would disagree on when to validate and wait for each other at the consensus point until"
            " `timeout`. HINT: use a float fraction of the epoch or an int number of batches."
        )


def check_equal_batches(counts: list[Any]) -> None:
    """Refuses training data that gives workers different numbers of batches per epoch (they would hang).

    With static work sharing, consensus points (epoch ends, every N batches) only line up when every worker has
    the same number of batches per epoch.

    Args:
        counts: every worker's ``trainer.num_training_batches``, by rank.
    """
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


def check_accelerator(accelerator: object) -> None:
    """fedhog runs its workers on CPU or CUDA devices only."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    if accelerator is not None and not isinstance(accelerator, (CPUAccelerator, CUDAAccelerator)):
        raise ValueError(
            f"fedhog supports `accelerator='cpu'` and `accelerator='gpu'` (CUDA), not {type(accelerator).__name__}."
            " HINT: use `strategy='ddp'` on this accelerator."
        )


def refuse_sync_batchnorm(layer_sync: object) -> None:
    """``sync_batchnorm`` would all-reduce inside every forward pass: every worker in lock-step."""
    if layer_sync is not None:
        raise ValueError(
            "`Trainer(sync_batchnorm=True)` is not supported by fedhog: it would synchronise every forward pass."
            " HINT: drop `sync_batchnorm`; fedhog averages BatchNorm running statistics with the parameters."
        )


def claims_by_batch(loader: object) -> bool:
    """Whether dynamic sharing can hand out ``loader``'s batches: a ``DataLoader`` over a map-style data set with a
    ``batch_size`` (one claim is one batch)."""
    return (
        isinstance(loader, DataLoader)
        and loader.batch_size is not None
        and not isinstance(loader.dataset, IterableDataset)
    )


def in_order(loader: DataLoader) -> bool:
    """Whether ``loader`` returns batches in the order its sampler yields them (what claim counting relies on)."""
    return getattr(loader, "in_order", True) is not False


def training_loaders(trainer: pl.Trainer) -> list[Any]:
    """The run's training loaders as Lightning set them up (one per entry of a dict or list of loaders)."""
    loaders = trainer.train_dataloader
    return [] if loaders is None else CombinedLoader(loaders).flattened


def refuse_several_loaders(trainer: pl.Trainer) -> None:
    """Dynamic sharing hands out one loader's batches; with several, each step would draw from each loader's counter
    at its own pace and Lightning's cycling of the shorter ones would train chunks twice or not at all."""
    count = len(training_loaders(trainer))
    if count > 1:
        raise ValueError(
            f"fedhog: `work_sharing='dynamic'` shares out the batches of one training loader, but this run has"
            f" {count} training loaders. HINT: combine the data sets into one loader (e.g. `ConcatDataset`, with a"
            f" sampler that weights them), or use `work_sharing='static'`."
        )


def dynamic_blocker(
    val_check_interval: object,
    step_checkpoints: list[str],
    max_time: bool = False,
    min_steps: int | None = None,
    dataloader_iter: bool = False,
) -> str | None:
    """Why the Trainer's settings rule dynamic sharing out (they need every worker to reach the same step, or batches
    in claim order), with the fix; None when nothing does.

    Args:
        val_check_interval: the Trainer's ``val_check_interval``.
        step_checkpoints: descriptions of callbacks that act every N steps or every T seconds.
        max_time: the Trainer has a ``Timer`` (``max_time=...``), which broadcasts after every step.
        min_steps: the Trainer's ``min_steps``: compared with each worker's own step count, so workers would
            disagree on whether an early stop may end the run.
        dataloader_iter: ``training_step`` takes the loader's iterator (it fetches batches itself, so fedhog
            cannot tell which batch a step trains).
    """
    hint = "HINT: keep validation and checkpoints at epoch ends, or use `work_sharing='static'`."
    if max_time:
        return (
            "dynamic sharing gives workers different step counts, but `Trainer(max_time=...)` (the `Timer` callback)"
            " broadcasts from rank 0 after every step, so the workers' broadcasts would not pair up and the run would"
            " hang at the first epoch end. HINT: bound the run with `max_epochs` or `max_steps`, or use"
            " `work_sharing='static'`."
        )
    if min_steps:
        return (
            f"dynamic sharing gives workers different step counts, so `Trainer(min_steps={min_steps})` would let an"
            f" early stop end `fit` on some workers and not on others. HINT: use `min_epochs`, or"
            f" `work_sharing='static'`."
        )
    if dataloader_iter:
        return (
            "dynamic sharing counts which of its claimed batches each worker trains, but this `training_step` takes"
            " `dataloader_iter` and fetches batches itself. HINT: take `batch` in `training_step`, or use"
            " `work_sharing='static'`."
        )
    if not (isinstance(val_check_interval, float) and val_check_interval == 1.0):
        return (
            f"dynamic sharing gives workers different numbers of batches per epoch, so validation can only run at the"
            f" end of an epoch, but `val_check_interval={val_check_interval!r}`. {hint}"
        )
    if step_checkpoints:
        return (
            f"dynamic sharing gives workers different step counts, so a checkpoint every N steps or T seconds would"
            f" be taken at different moments on different workers: {', '.join(step_checkpoints)}. {hint}"
        )
    return None


def loader_blocker(trainer: pl.Trainer) -> str | None:
    """Why the run's training loader rules dynamic sharing out (for ``"auto"``, which decides during training)."""
    flattened = training_loaders(trainer)
    if not flattened:
        return "the training loader is not set up. HINT: use `work_sharing='static'` or `'dynamic'`."
    if len(flattened) > 1:
        return (
            f"it shares out one training loader's batches and this run has {len(flattened)}. HINT: combine the data"
            f" sets into one loader (`ConcatDataset`), or accept the idle time."
        )
    loader = flattened[0]
    if not claims_by_batch(loader):
        return (
            "it needs a `DataLoader` over a map-style data set with a `batch_size`. HINT: give the loader a"
            " `batch_size` (not a custom `batch_sampler`) over a data set with `__getitem__` and `__len__`."
        )
    if not isinstance(loader.sampler, DistributedSampler):
        return (
            "the training loader's sampler is not Lightning's distributed sampler (`use_distributed_sampler=False`), so"
            " each worker's loader may hold a shard of its own, and sharing one index list would mix them up. HINT: use"
            " `work_sharing='dynamic'` if every worker's loader holds the whole data set, else `'static'`."
        )
    if not in_order(loader):
        return "it needs the loader's batches in order. HINT: leave `in_order=True` (the default)."
    sampler = internals.sampler_inside_wrapper(loader.sampler) or loader.sampler
    if not isinstance(sampler, Sized):
        return f"it needs a sampler with a length, and {type(sampler).__name__} has none. HINT: give it `__len__`."
    return None
