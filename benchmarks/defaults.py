"""P10, the defaults matrix: does ``strategy="fedhog"`` with no knobs win where a user meets it?

Four scenarios, each trained to a test accuracy by four methods, in one interleaved run (repeat ``i`` of every
method and scenario uses ``seed_everything=i``):

- ``none``: the MNIST-1D recipe to 0.90 with nothing in the way;
- ``straggler``: the same with device 1 about 2x slower from the start (it sleeps before every batch as long as one
  process's step takes alone, measured once, the same for every method);
- ``halfway``: the same sleep from epoch :data:`HALFWAY_EPOCH` on (about half of the epochs DDP needs to 0.90);
- ``thin_link``: the 105,738-parameter CNN of P7 to 0.85 with both devices on a 20 Mbit/s link.

The methods: DDP, post-local SGD (parameters averaged every 16 steps), fedhog with no knobs at all
(``--trainer.strategy=fedhog``), and fedhog with the best setting known for the scenario (:data:`BEST`). Every run
stops at the first epoch end whose validation reaches the target (``EarlyStopping`` with a threshold): a time to the
target is read from the same epoch ends whether or not the run goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.accuracy import P7_CHANNELS, P7_TARGET, POST_LOCAL_YAML, mnist1d, recipe_step_seconds, straggler_options
from benchmarks.catalog import Method, Scale

SCENARIOS = ("none", "straggler", "halfway", "thin_link")
METHODS = ("ddp", "post_local_sgd", "fedhog", "fedhog_best")

HALFWAY_EPOCH = 7
"""The epoch (from 0) from which device 1 is slow in ``halfway``: DDP needs 14-16 epochs to 0.90 (P4, P13)."""

TARGET = 0.90
EPOCHS = 30  # a cap: every method passed 0.90 by epoch 20 in P4, P8 and P13
THIN_EPOCHS = 8  # a cap: every method passed 0.85 by epoch 5 in P7 and P9 but one post-local SGD seed

ONE = "--trainer.strategy.workers_per_device=1"
BEST = {
    "none": [ONE, "--trainer.strategy.work_sharing=static", "--trainer.strategy.compression=none"],
    "straggler": [ONE, "--trainer.strategy.work_sharing=dynamic"],
    "halfway": [ONE, "--trainer.strategy.work_sharing=dynamic"],
    "thin_link": [ONE, "--trainer.strategy.compression=int8", "--trainer.strategy.averaging_period=auto",
                  "--trainer.strategy.num_blocks=2"],
}
"""fedhog's best known setting per scenario (P4, P8, P9): 2 devices x 1 worker, and dynamic work sharing with a
straggler or int8 rounds with the self-paced period in 2 blocks on a thin link."""


def _stop_at(target: float) -> list[str]:
    return ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val_acc", "--trainer.callbacks.mode=max",
            f"--trainer.callbacks.stopping_threshold={target}", "--trainer.callbacks.patience=1000"]


def p10_defaults(scale: Scale, workdir: Path) -> dict[str, Any]:
    """P10: every scenario x method above, time to the scenario's target accuracy (medians over seeds)."""
    data = workdir / "mnist1d-data"
    post_local = workdir / "post_local_sgd.yaml"
    post_local.write_text(POST_LOCAL_YAML)
    smoke = scale.name == "smoke"
    step = 0.002 if smoke else recipe_step_seconds(scale, data, workdir)  # the smoke run spares a launch
    link = [] if smoke else harness.thin_link_prefix("20mbit")

    hindrance: dict[str, list[str]] = {
        "none": [], "straggler": straggler_options(step, 0),
        "halfway": straggler_options(step, 1 if smoke else HALFWAY_EPOCH),
        "thin_link": [f"--model.channels={P7_CHANNELS}"],
    }
    strategies = {
        "ddp": ["--trainer.strategy=ddp"], "post_local_sgd": [f"--config={post_local}"],
        "fedhog": ["--trainer.strategy=fedhog"],
    }
    methods: dict[str, Method] = {}
    baselines: dict[str, str] = {}
    for scenario in SCENARIOS:
        if scenario == "thin_link" and link is None:
            continue  # no root or no tc: the three other scenarios still run
        target = P7_TARGET if scenario == "thin_link" else TARGET
        epochs = scale.mnist_epochs if smoke else THIN_EPOCHS if scenario == "thin_link" else EPOCHS
        for method in METHODS:
            how = strategies.get(method, BEST[scenario])  # on the recipe's FedHogStrategy (whose K=2 ONE replaces)
            options = [*how, *hindrance[scenario], *_stop_at(target)]
            prefix = link if scenario == "thin_link" else []
            methods[f"{scenario}_{method}"] = mnist1d(options, 2, scale, data, epochs, target=target,
                                                     prefix=prefix or ())
            baselines[f"{scenario}_{method}"] = f"{scenario}_ddp"
    return {"methods": methods, "baseline": "none_ddp", "baselines": baselines,
            "settings": {"target_accuracy": TARGET, "thin_link_target_accuracy": P7_TARGET, "batch_per_process": 32,
                         "samples": scale.mnist_samples, "recipe": "python -m recipes.mnist1d fit",
                         "processes": "2 for every method (2 devices; fedhog with no knobs takes 1 worker per CPU"
                         " device)",
                         "epochs": f"at most {EPOCHS} ({THIN_EPOCHS} on the thin link); every run stops at the first"
                         " epoch end whose validation reaches the target",
                         "straggler": "rank 1 sleeps before every batch as long as one process's training step takes"
                         f" alone ({step:.6f} s, measured once): about 2x slower, the same for every method",
                         "halfway": f"the same sleep from epoch {HALFWAY_EPOCH} (from 0) on",
                         "thin_link": f"--model.channels={P7_CHANNELS} (105,738 parameters); loopback of a private"
                         " netns, tc tbf rate 20mbit (all ranks' traffic shares it)" + ("" if link is not None else
                         f"; skipped here: {harness.thin_link_unavailable()}"),
                         "ddp": "2 processes", "post_local_sgd": "torch's post_localSGD_hook from step 1, parameters"
                         " averaged every 16 steps", "fedhog": "--trainer.strategy=fedhog: no knob set",
                         "fedhog_best": {scenario: " ".join(BEST[scenario]) for scenario in SCENARIOS},
                         "seeds": "repeat i uses seed_everything=i"}}


def _verdict(ratio: float) -> str:
    return "wins" if ratio < 0.95 else "ties" if ratio <= 1.05 else "loses"


def matrix_lines(report: dict[str, Any]) -> list[str]:
    """P10's wins/ties/losses table: per scenario, each method's median time to the target and fedhog with no
    knobs against DDP, post-local SGD and its best setting (within 5%: a tie)."""
    results = report["results"]
    lines = ["| scenario | DDP | post-local SGD | fedhog, no knobs | fedhog, best setting | no knobs vs DDP |"
             " vs post-local SGD | vs best setting |", "|---|---|---|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        times = {method: results.get(f"{scenario}_{method}", {}).get("seconds_to_target") for method in METHODS}
        if f"{scenario}_ddp" not in results:
            continue
        cells = ["not reached" if times[m] is None else f"{times[m]:.1f} s" for m in METHODS]
        mine = times["fedhog"]
        against = []
        for other in ("ddp", "post_local_sgd", "fedhog_best"):
            theirs = times[other]
            if mine is None or theirs is None:
                against.append("-" if mine is None else "**wins** (it never reached the target)")
            else:
                ratio = mine / theirs
                verdict = _verdict(ratio) if other != "fedhog_best" else ("within 1.15x" if ratio <= 1.15 else
                                                                           "over 1.15x")
                against.append(f"{ratio:.2f}x: **{verdict}**")
        lines.append(f"| {SCENARIO_TITLES[scenario]} | " + " | ".join(cells) + " | " + " | ".join(against) + " |")
    return lines


SCENARIO_TITLES = {
    "none": "no hindrance (to 0.90)",
    "straggler": "one device 2x slower (to 0.90)",
    "halfway": f"one device 2x slower from epoch {HALFWAY_EPOCH} (to 0.90)",
    "thin_link": "20 Mbit/s link, 105k-parameter CNN (to 0.85)",
}
