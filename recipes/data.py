"""DataModules for CIFAR-10, CIFAR-100 and ImageNet with the standard augmentations of the paper's recipes.

Each takes ``data_dir`` and ``download``; a data set that is missing on disk fails with a message naming the
path and how to get it, not with a traceback from deep inside torchvision.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _loader(dataset: Dataset, hparams: Any, shuffle: bool) -> DataLoader:
    """Training loaders shuffle and drop the last partial batch (BatchNorm dislikes tiny batches)."""
    return DataLoader(
        dataset, batch_size=hparams.batch_size, shuffle=shuffle, num_workers=hparams.num_workers,
        persistent_workers=hparams.num_workers > 0, drop_last=shuffle,
    )


CIFAR_FILES = {
    10: ("cifar-10-batches-py", [f"data_batch_{index}" for index in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
"""Per data set: its folder, its training and test files, and the key of the labels in each file."""


class CIFARPickles(Dataset):
    """CIFAR-10/100 read from the python-pickle files in ``root`` (``<root>/cifar-10-batches-py/data_batch_1``...).

    Read here rather than with torchvision's reader, whose md5 check rejects any copy of the files that was packed
    again; the files are checked by loading them. Items are ``(transform(PIL image), label)``, as torchvision's.
    """

    def __init__(self, root: str | Path, num_classes: int, train: bool, transform: Any = None) -> None:
        folder, training, testing, key = CIFAR_FILES[num_classes]
        images, self.labels = [], []
        for name in training if train else testing:
            with open(Path(root) / folder / name, "rb") as infile:
                entry = pickle.load(infile, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            self.labels += [int(label) for label in entry[key]]
        self.images = np.concatenate(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform is not None else image), self.labels[index]


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10/100 from the torchvision python-pickle layout (``<data_dir>/cifar-10-batches-py/...``).

    Args:
        data_dir: the folder that holds (or will hold) ``cifar-10-batches-py`` / ``cifar-100-python``.
        download: fetch the data set if it is missing (needs internet access).
        batch_size: per-worker batch size (the paper: 256 for ResNet-20, 64 for WRN-16-8).
        num_workers: DataLoader worker processes per training worker.
        augment: random crop with 4-pixel padding and horizontal flip for training.
    """

    num_classes = 10

    def __init__(
        self, data_dir: str = "data", download: bool = False, batch_size: int = 128, num_workers: int = 2,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _folder(self) -> Path:
        return Path(self.hparams.data_dir) / CIFAR_FILES[self.num_classes][0]

    def prepare_data(self) -> None:
        if self.hparams.download and not self._folder().is_dir():  # a copy already there is used as it is
            torchvision_cls = torchvision.datasets.CIFAR10 if self.num_classes == 10 else torchvision.datasets.CIFAR100
            for train in (True, False):
                torchvision_cls(self.hparams.data_dir, train=train, download=True)
        else:
            self._require_folder()

    def _require_folder(self) -> None:
        if not self._folder().is_dir():
            name = f"CIFAR-{self.num_classes}"
            raise FileNotFoundError(
                f"{name} was not found at {self._folder()}. HINT: pass `--data.download=true` to fetch it, or copy"
                f" the extracted python version of {name} (https://www.cs.toronto.edu/~kriz/cifar.html) there."
            )

    def _transform(self, train: bool) -> T.Compose:
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and self.hparams.augment else []
        normalize = T.Normalize(CIFAR_MEAN[self.num_classes], CIFAR_STD[self.num_classes])
        return T.Compose([*steps, T.ToTensor(), normalize])

    def setup(self, stage: str) -> None:
        self._require_folder()  # prepare_data ran on local rank 0 only; every rank checks before reading
        root, classes = self.hparams.data_dir, self.num_classes
        self.train = CIFARPickles(root, classes, train=True, transform=self._transform(True))
        self.test = CIFARPickles(root, classes, train=False, transform=self._transform(False))

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train, self.hparams, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.test, self.hparams, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return _loader(self.test, self.hparams, shuffle=False)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images, 10 classes)."""

    num_classes = 10


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (50,000 training and 10,000 test images, 100 classes)."""

    num_classes = 100


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet (ILSVRC-2012) in the ImageFolder layout: ``<data_dir>/train/<class>/*.JPEG`` and ``.../val/...``.

    Args:
        data_dir: the folder with ``train`` and ``val``.
        download: ImageNet cannot be downloaded automatically; True only explains how to get it.
        batch_size: per-worker batch size (the paper: 32).
        num_workers: DataLoader worker processes per training worker.
        image_size: training crop size (224); validation resizes to ``image_size * 8/7`` and center-crops.
    """

    num_classes = 1000

    def __init__(
        self, data_dir: str = "data/imagenet", download: bool = False, batch_size: int = 32, num_workers: int = 4,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        missing = [split for split in ("train", "val") if not (Path(self.hparams.data_dir) / split).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageNet was not found at {os.path.abspath(self.hparams.data_dir)} (missing: {', '.join(missing)})."
                " HINT: ImageNet needs a license and cannot be downloaded automatically; get ILSVRC-2012 from"
                " https://image-net.org and arrange it as <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/."
            )

    def setup(self, stage: str) -> None:
        self.prepare_data()
        size = self.hparams.image_size
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        val_tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), normalize])
        root = Path(self.hparams.data_dir)
        self.train = torchvision.datasets.ImageFolder(root / "train", transform=train_tf)
        self.val = torchvision.datasets.ImageFolder(root / "val", transform=val_tf)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train, self.hparams, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.val, self.hparams, shuffle=False)
