"""The weighted training mix: a family per `--dataset` name, chosen by `--sample_rates`, then a
sub-dataset and a record uniformly, from a generator seeded by (seed, epoch, index).

Seeding by (seed, epoch, index) makes item `i` of epoch `e` the same sample whatever the number
of loader workers or the order they ask in, and after a resume. Adding a family is one module
and one entry in `FAMILY_BUILDERS`.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from utils.datasets.base import DataError, Sample, SamplingOptions, Source, UnusableSample

LOGGER = logging.getLogger(__name__)
# family name -> (module, factory); factory(dataset_dir, names, options) -> list[Source]
FAMILY_BUILDERS: dict[str, tuple[str, str]] = {
    "sem_seg": ("utils.datasets.sem_seg", "build_sem_seg_sources"),
    "refer_seg": ("utils.datasets.refer_seg", "build_refer_seg_sources"),
    "vqa": ("utils.datasets.vqa", "build_vqa_sources"),
    "reason_seg": ("utils.datasets.reason_seg", "build_reason_seg_sources"),
    "multi_part_reason_seg": ("utils.datasets.mmr", "build_mmr_sources"),
}
MAX_DRAWS = 20
# what reading a bad record raises at run time: DataError and other ValueErrors (malformed
# records), OSError (unreadable files); --skip_bad_samples skips exactly these
BAD_RECORD_ERRORS = (ValueError, OSError)
SKIPPED_ATTRIBUTE = "skipped_samples"
# `--*_data` defaults of the LISA/MMR command lines ("||"-joined sub-dataset names)
DEFAULT_FAMILY_DATA: dict[str, str] = {
    "sem_seg": "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
    "refer_seg": "refclef||refcoco||refcoco+||refcocog",
    "vqa": "llava_instruct_150k",
    "reason_seg": "ReasonSeg|train",
    "multi_part_reason_seg": "MMR_train.json",
}


@dataclass(frozen=True)
class DataConfig:
    """The training mix (train_ds.py flags; lists already split on "||" / ",").

    family_data: for each family, the names of its sub-datasets (`--sem_seg_data` etc.).
    """

    dataset_dir: Path
    dataset: tuple[str, ...] = ("sem_seg", "refer_seg", "vqa", "reason_seg")
    sample_rates: tuple[float, ...] = (9, 3, 3, 1)
    family_data: dict[str, tuple[str, ...]] = field(default_factory=dict)
    options: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int = 0


def check_rates(dataset: Sequence[str], rates: Sequence[float]) -> np.ndarray:
    """Normalised rates; errors name both lists when they disagree."""
    if len(rates) != len(dataset):
        raise ValueError(
            f"--sample_rates has {len(rates)} values {list(rates)} but --dataset names "
            f"{len(dataset)} families {list(dataset)}; give one rate per family"
        )
    weights = np.asarray(rates, dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"--sample_rates must be non-negative with a positive sum: {list(rates)}")
    return weights / weights.sum()


def family_factory(family: str) -> Callable[..., list[Source]]:
    """The source factory of a `--dataset` family name."""
    if family not in FAMILY_BUILDERS:
        raise ValueError(f"unknown --dataset family {family!r}; known: {sorted(FAMILY_BUILDERS)}")
    module, function = FAMILY_BUILDERS[family]
    return getattr(importlib.import_module(module), function)


def build_sources(config: DataConfig) -> list[tuple[str, list[Source]]]:
    """(family, sources) for every `--dataset` family, in order; DataError if one is unusable."""
    check_rates(config.dataset, config.sample_rates)
    families = []
    for family in config.dataset:
        names = list(config.family_data.get(family, ()))
        sources = family_factory(family)(Path(config.dataset_dir), names, config.options)
        if not sources:
            raise DataError(config.dataset_dir, family, "no usable sub-dataset", f"names {names}")
        families.append((family, sources))
    return families


class HybridDataset(Dataset):
    """`length` items per epoch, each drawn from the weighted mix.

    process: optional Sample -> item transform (tokenization, pixels); when it raises
    UnusableSample (e.g. every conversation longer than the limit), another sample is drawn.
    skip_bad_samples (`--skip_bad_samples`): a record that fails to read (a DataError or another
    ValueError / OSError from the source or from `process`) is skipped and another drawn from
    the same generator, so the item stays a function of (seed, epoch, index); the item then
    carries the skips as its `skipped_samples` attribute ({source name: count}, empty when none),
    which the training loader sums per epoch. Without it such an error propagates.
    """

    def __init__(
        self,
        families: list[tuple[str, list[Source]]],
        rates: Sequence[float],
        length: int,
        seed: int = 0,
        process: Callable[[Sample], object] | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        self.families = families
        self.probabilities = check_rates([name for name, _ in families], rates)
        self.length = length
        self.seed = seed
        self.process = process
        self.skip_bad_samples = skip_bad_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples `__getitem__` returns (call on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def choose_source(self, rng: np.random.Generator) -> Source:
        """A family by rate, then a sub-dataset uniformly."""
        family = int(rng.choice(len(self.families), p=self.probabilities))
        sources = self.families[family][1]
        return sources[int(rng.integers(len(sources)))]

    def draw(self, rng: np.random.Generator) -> Sample:
        """A family by rate, then a sub-dataset uniformly, then the source's own sampling."""
        return self.choose_source(rng).sample(rng)

    def __getitem__(self, index: int):
        rng = self.generator(index)
        skipped: Counter[str] = Counter()
        last_error: Exception | None = None
        for _ in range(MAX_DRAWS):
            source = self.choose_source(rng)
            try:
                sample = source.sample(rng)
                item = sample if self.process is None else self.process(sample)
            except UnusableSample as reason:
                LOGGER.info("drew another sample: %s", reason)
                continue
            except BAD_RECORD_ERRORS as error:
                if not self.skip_bad_samples:
                    raise
                skipped[source.name] += 1
                last_error = error
                LOGGER.warning("--skip_bad_samples: skipped a record of %s: %s", source.name, error)
                continue
            if self.skip_bad_samples:
                setattr(item, SKIPPED_ATTRIBUTE, dict(skipped))
            return item
        raise RuntimeError(
            f"{MAX_DRAWS} draws in a row gave unusable samples (item {index}); skipped bad "
            f"records: {dict(skipped) or 'none'}; last error: {last_error}"
        ) from last_error


def skipped_samples(item: object) -> dict[str, int] | None:
    """The bad records skipped while drawing `item` ({source name: count}), None when the mixer
    did not count (no --skip_bad_samples)."""
    counts = getattr(item, SKIPPED_ATTRIBUTE, None)
    return None if counts is None else dict(counts)
