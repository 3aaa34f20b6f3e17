"""The list of sample indices one epoch trains, drawn from the user's sampler identically on every worker.

Dynamic work sharing hands out an epoch's indices in chunks from a shared counter, so every worker must hold the
same list for the same epoch. The list is the user's: Lightning's own distributed sampler (which it makes for a
``RandomSampler`` or ``SequentialSampler`` and which gives every epoch a permutation of the whole data set) is
replaced by the same permutation; any other sampler (``SubsetRandomSampler`` for a train/validation split,
``WeightedRandomSampler``, a custom one) is drawn once per epoch with every random generator it could use seeded from
the run's seed and the epoch, and put back as it was afterwards. So weights, replacement, subsets and order keep
their meaning, and each epoch's list is a function of the seed and the epoch: a resumed run draws the same lists.
A sampler whose list still differs between workers (one that reads the clock, a data set that differs per rank) is
caught by :func:`fingerprint`, compared across workers in the shared store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

from lightning_fedhog import internals

try:  # numpy is optional; a sampler that uses its global generator is seeded too when it is there
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
    np = None  # type: ignore[assignment]


def permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of a data set of ``num_samples`` samples, the same on every worker."""
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator).tolist()


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


@contextlib.contextmanager
def _seeded(seed: int, own_generator: torch.Generator | None) -> Iterator[None]:
    """Seeds torch's, Python's and numpy's global generators (and a sampler's own torch generator) with ``seed``,
    then puts every one of them back as it was: the user's random streams are not disturbed."""
    python_state = random.getstate()
    numpy_state = np.random.get_state() if np is not None else None
    own_state = own_generator.get_state() if own_generator is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed(seed % 2**32)
        if own_generator is not None:
            own_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            if np is not None:
                np.random.set_state(numpy_state)
            if own_generator is not None:
                own_generator.set_state(own_state)


def draw(sampler: Sampler[Any], seed: int, epoch: int) -> list[int]:
    """One epoch's indices from ``sampler``, with its random generators seeded from ``seed`` and ``epoch``."""
    set_epoch = getattr(sampler, "set_epoch", None)
    if callable(set_epoch):  # as Lightning's wrapper forwards it to the sampler it wraps
        set_epoch(epoch)
    generator = getattr(sampler, "generator", None)
    with _seeded(_epoch_seed(seed, epoch), generator if isinstance(generator, torch.Generator) else None):
        return [int(index) for index in sampler]


def fingerprint(indices: list[int]) -> str:
    """A short digest of an index list, to compare across workers through the store."""
    return hashlib.blake2b(torch.tensor(indices, dtype=torch.int64).numpy().tobytes(), digest_size=12).hexdigest()


class EpochIndices:
    """What one training loader's epoch consists of: its length, and each epoch's list of indices.

    Args:
        sampler: the loader's sampler after Lightning set it up for distributed training.
        num_samples: the loader's data set length (used when the sampler is Lightning's over the whole data set).
    """

    def __init__(self, sampler: Sampler[Any] | Any, num_samples: int) -> None:
        inner = internals.sampler_inside_wrapper(sampler)
        self.seed = int(getattr(sampler, "seed", os.environ.get("PL_GLOBAL_SEED", 0)) or 0)
        self.whole_data_set = inner is None and isinstance(sampler, DistributedSampler)
        self.shuffle = bool(getattr(sampler, "shuffle", True))
        self.sampler: Sampler[Any] | Any = sampler if inner is None else inner
        if self.whole_data_set:
            self.length = num_samples
        elif isinstance(self.sampler, Sized) and not isinstance(len(self.sampler), float):
            self.length = len(self.sampler)
        else:
            raise ValueError(
                f"fedhog: `work_sharing='dynamic'` shares out the indices of the training loader's sampler, but"
                f" {type(self.sampler).__name__} has no length. HINT: give the sampler a `__len__`, or use"
                f" `work_sharing='static'`."
            )
        self._cached: tuple[int, list[int]] | None = None

    def __call__(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s indices (drawn once per epoch, then kept: a second pass sees the same list)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.whole_data_set:
            indices = permutation(self.length, self.seed, epoch) if self.shuffle else list(range(self.length))
        else:
            indices = draw(self.sampler, self.seed, epoch)
            if len(indices) != self.length:
                raise RuntimeError(
                    f"fedhog: the training sampler {type(self.sampler).__name__} yielded {len(indices)} indices in"
                    f" epoch {epoch} but its `len()` is {self.length}. HINT: make `__len__` match what it yields."
                )
        self._cached = (epoch, indices)
        return indices
