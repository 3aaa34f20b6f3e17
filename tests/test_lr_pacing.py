"""Per-step LR schedules paced by the run's progress (dynamic work sharing), and the straggler report: pure logic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_fedhog.lr_pacing import PacedScheduler, pace_step_schedulers, unpace
from lightning_fedhog.stragglers import StragglerWatch, idle_report


def _cosine(total: int) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def test_a_fast_worker_waits_for_the_run_and_a_slow_one_catches_up() -> None:
    progress = [0.0]
    fast = PacedScheduler(_cosine(10), lambda: progress[0], total=10)
    slow = PacedScheduler(_cosine(10), lambda: progress[0], total=10)
    for _ in range(3):  # the fast worker steps 3 times while the run advances by 1 average step
        fast.step()
    assert fast.scheduler.last_epoch == 0
    progress[0] = 1.5
    fast.step()
    assert fast.scheduler.last_epoch == 1
    progress[0] = 9.7
    slow.step()  # one step of the slow worker, late in the run: its schedule jumps to where the run is
    assert slow.scheduler.last_epoch == 9
    progress[0] = 12.0  # rounding up the last epoch: never past the schedule's end
    fast.step()
    assert fast.scheduler.last_epoch == 10
    assert fast.get_last_lr() == pytest.approx([0.0], abs=1e-12)


def test_only_step_interval_lr_schedulers_are_paced_and_given_back() -> None:
    cosine = _cosine(10)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    configs = [
        SimpleNamespace(scheduler=cosine, interval="step", frequency=2),
        SimpleNamespace(scheduler=_cosine(5), interval="epoch", frequency=1),
        SimpleNamespace(scheduler=plateau, interval="step", frequency=1),
    ]
    assert pace_step_schedulers(configs, lambda: 4.0, total=10.0) == 1
    paced = configs[0].scheduler
    assert isinstance(paced, PacedScheduler) and paced.optimizer is cosine.optimizer
    paced.step()
    assert cosine.last_epoch == 2, "frequency 2: one schedule step per 2 average worker steps"
    assert paced.state_dict() == cosine.state_dict()
    unpace(configs)
    assert configs[0].scheduler is cosine


def test_the_straggler_report_names_the_idle_share_and_the_fix() -> None:
    report = idle_report([0.4, 2.0, 0.5, 2.0], devices=[0, 1, 0, 1])
    assert report is not None
    assert "rank 1 (device 1) trained 2.00 s" in report and "rank 0 (device 0) 0.40 s" in report
    assert "idled 80%" in report and "work_sharing='dynamic'" in report
    assert idle_report([1.6, 2.0], devices=[0, 1]) is None, "20% is noise"
    assert idle_report([0.1, 1.0], devices=[0, 1]) is None, "too short to judge"
    assert idle_report([0.2, 2.0], devices=[0, 0]) is None, "one device: its workers share one copy anyway"


def _watch(switch, busy: list[float]) -> tuple[StragglerWatch, list[str]]:
    gathers: list[str] = []

    def gather(mine: tuple[float, int]) -> list[tuple[float, int]]:
        gathers.append("gather")
        return [(seconds, rank) for rank, seconds in enumerate(busy)]

    clock = iter(float(t) for t in range(100))
    return StragglerWatch(gather, device=0, devices=2, report=True, clock=lambda: next(clock), switch=switch), gathers


@pytest.mark.parametrize("blocker", [None, "dynamic sharing ... `max_time=...` ... HINT: bound the run"])
def test_auto_switches_once_on_idle_devices_or_says_why_it_cannot(caplog, blocker: str | None) -> None:
    switched: list[bool] = []
    watch, gathers = _watch(lambda: switched.append(True) or blocker, busy=[0.6, 2.0])
    with caplog.at_level("INFO", logger="lightning_fedhog.stragglers"):
        for _ in range(3):  # three epoch-end meetings with training before each
            watch.batch_starts()
            watch.at_meeting(watch.trained())
    assert switched == [True] and gathers == ["gather"], "acts once, then measures no more (one collective fewer)"
    message = caplog.text
    if blocker is None:
        assert "shared dynamically from the next epoch" in message and "idled 70%" in message
    else:
        assert "cannot switch to `work_sharing='dynamic'` by itself here" in message and "max_time" in message


def test_auto_keeps_static_shards_while_the_devices_keep_pace() -> None:
    switched: list[bool] = []
    watch, gathers = _watch(lambda: switched.append(True), busy=[1.8, 2.0])
    for _ in range(3):
        watch.batch_starts()
        watch.at_meeting(watch.trained())
    assert switched == [] and gathers == ["gather"] * 3 and watch.last is not None and watch.last.fraction < 0.25


def test_short_epochs_are_judged_together_so_one_noisy_epoch_does_not_switch() -> None:
    """Spans are summed until the slowest worker's sum reaches 2 s: one noisy epoch of 1 s does not decide alone."""
    epochs = iter([[0.7, 1.0], [1.0, 1.0], [0.3, 1.0], [0.3, 1.0]])  # 30% idle once, then a real straggler
    switched: list[int] = []
    gathers: list[int] = []

    def gather(mine: tuple[float, int]) -> list[tuple[float, int]]:
        gathers.append(1)
        return [(seconds, rank) for rank, seconds in enumerate(next(epochs))]

    watch = StragglerWatch(gather, device=0, devices=2, report=False, switch=lambda: switched.append(len(gathers)))
    for _ in range(4):
        watch.batch_starts()
        watch.at_meeting(1.0)
    assert switched == [4], "the first window (15% idle) kept static shards, the second (70%) switched"
