"""Recipes: every shipped config parses, knobs are settable, loaders read the real on-disk formats, and short
CIFAR and ImageNet runs train under fedhog on data generated here."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from recipes.cli import main as cli_main
from recipes.data import CIFAR10DataModule, CIFAR100DataModule, ImageNetDataModule
from recipes.make_configs import CONFIG_DIR, all_configs
from tests.conftest import forkserver

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
ROOT = Path(__file__).parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def test_committed_configs_are_the_generated_ones() -> None:
    generated = all_configs()
    assert sorted(generated) == [path.name for path in CONFIGS]
    for path in CONFIGS:
        assert path.read_text() == generated[path.name], f"{path.name} is stale: run `python -m recipes.make_configs`"


def _print_config(*args: str) -> dict:
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    return {}


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_shipped_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _print_config("--config", str(path))
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] in path.stem
    assert printed["data"]["class_path"].startswith("recipes.data.")


def test_strategy_knobs_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(CONFIG_DIR / "cifar10_resnet20_fedhog.yaml")
    _print_config("--config", config, "--trainer.strategy.workers_per_device=3", "--trainer.strategy.num_blocks=4")
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_fedhog.FedHogStrategy"
    assert strategy["init_args"]["workers_per_device"] == 3 and strategy["init_args"]["num_blocks"] == 4


def _write_cifar(root: Path, classes: int, per_batch: int = 24) -> None:
    rng = np.random.default_rng(0)
    label_key = "labels" if classes == 10 else "fine_labels"  # the real (python 2) pickles load with str keys

    def batch(count: int) -> dict:
        pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        return {"data": pixels, label_key: rng.integers(0, classes, count).tolist()}

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(pickle.dumps(batch(per_batch), protocol=2))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name in ("train", "test"):
            (folder / name).write_bytes(pickle.dumps(batch(per_batch * 2), protocol=2))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=2))


def _write_imagefolder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("n01440764", "n01443537"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(6):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}_{index}.JPEG")


@pytest.mark.parametrize(("module_cls", "classes"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_cifar_loaders_read_the_python_pickle_format(tmp_path: Path, module_cls: type, classes: int) -> None:
    _write_cifar(tmp_path, classes)
    data = module_cls(data_dir=str(tmp_path), batch_size=8, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.max() < classes
    assert len(data.train) == (120 if classes == 10 else 48)


def test_imagenet_loader_reads_the_imagefolder_layout(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path)
    data = ImageNetDataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0, image_size=32)
    data.setup("fit")
    images, _ = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(data.train.classes) == {"n01440764", "n01443537"}


def test_missing_data_sets_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 was not found at .*cifar-10-batches-py. HINT: pass"):
        CIFAR10DataModule(data_dir=str(tmp_path)).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 was not found .*HINT"):
        CIFAR100DataModule(data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"ImageNet was not found at .* \(missing: train, val\). HINT"):
        ImageNetDataModule(data_dir=str(tmp_path)).prepare_data()


def _fit(tmp_path: Path, config: str, data_dir: Path, workers: int, *extra: str) -> str:
    """One epoch of a recipe on 2 CPU devices, its ranks forked from the test session's zygote."""
    args = [
        "fit", "--config", str(CONFIG_DIR / config),
        f"--data.init_args.data_dir={data_dir}", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
        f"--trainer.strategy.init_args.workers_per_device={workers}", *extra,
    ]
    returncode, output = forkserver().run(None, args, 2 * workers, _env(), ROOT, 300, module="recipes")
    assert returncode == 0, output[-6000:]
    return output


def test_cifar10_recipe_trains_under_fedhog(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "data", 10)
    output = _fit(
        tmp_path, "cifar10_resnet20_fedhog.yaml", tmp_path / "data", 1, "--data.init_args.batch_size=8",
    )
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in output
    assert list((tmp_path / "run").rglob("*.ckpt")), "a checkpoint of the consensus model was written"


def test_imagenet_recipe_trains_under_fedhog_lpp(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "imagenet")
    output = _fit(
        tmp_path, "imagenet_resnet50_fedhog_lpp.yaml", tmp_path / "imagenet", 2, "--data.init_args.batch_size=2",
        "--data.init_args.image_size=32", "--model.model=resnet18", "--trainer.strategy.init_args.partial_backprop=0",
    )
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in output


def test_mnist1d_default_job_runs_and_learns(tmp_path: Path) -> None:
    args = [
        "fit", "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--data.data_dir={tmp_path / 'data'}",
    ]
    returncode, output = forkserver().run(None, args, 4, _env(), ROOT, 300, module="recipes.mnist1d")  # 2 x 2
    assert returncode == 0, output[-6000:]
    line = next(line for line in output.splitlines() if line.startswith("MNIST-1D test accuracy"))
    assert float(line.rsplit(" ", 1)[1]) > 0.4  # 4 epochs; the full 100-epoch default reaches about 0.94
