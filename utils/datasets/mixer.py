"""The training sets: the weighted mix (a family per `--dataset` name, chosen by
`--sample_rates`, then a sub-dataset, uniformly or by the custom files' weights, then a record
uniformly; `HybridDataset`) and GSVA's `--no_sampling` full pass over one source
(`FullPassDataset`), both from generators seeded by (seed, epoch, index).

Seeding by (seed, epoch, index) makes item `i` of epoch `e` the same sample whatever the number
of loader workers or the order they ask in, and after a resume. A draw that cannot be used is
replaced from the same family (the mix keeps its rates). Adding a family is one module and one
entry in `FAMILY_BUILDERS`.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

from utils.datasets.base import DataError, Sample, SamplingOptions, Source, UnusableSample
from utils.datasets.lasagna import DEFAULT_NUM_ALL_CLASSES

LOGGER = logging.getLogger(__name__)
# family name -> (module, factory); factory(dataset_dir, names, options, **its
# FAMILY_SETTINGS) -> list[Source]
FAMILY_BUILDERS: dict[str, tuple[str, str]] = {
    "sem_seg": ("utils.datasets.sem_seg", "build_sem_seg_sources"),
    "refer_seg": ("utils.datasets.refer_seg", "build_refer_seg_sources"),
    "vqa": ("utils.datasets.vqa", "build_vqa_sources"),
    "reason_seg": ("utils.datasets.reason_seg", "build_reason_seg_sources"),
    "multi_part_reason_seg": ("utils.datasets.mmr", "build_mmr_sources"),
    "custom": ("utils.datasets.custom", "build_custom_sources"),
    "lasagna_sem_seg": ("utils.datasets.lasagna_sem_seg", "build_lasagna_sem_seg_sources"),
}
# the DataConfig fields a family's factory also takes, as keywords of the same name
FAMILY_SETTINGS: dict[str, tuple[str, ...]] = {"lasagna_sem_seg": ("num_all_classes",)}
MAX_DRAWS = 20
# what reading a bad record raises at run time: DataError and other ValueErrors (malformed
# records), OSError (unreadable files); --skip_bad_samples skips exactly these
BAD_RECORD_ERRORS = (ValueError, OSError)
SKIPPED_ATTRIBUTE = "skipped_samples"
# a draw: reads one sample (with the item's generator bound)
Draw = Callable[[], Sample]
# the full pass's record order comes from SeedSequence([seed, epoch]) spawned apart, because a
# seed list with trailing zeros is the same seed: [seed, epoch] would equal item 0's generator
ORDER_SPAWN_KEY = (1,)
# `--*_data` defaults of the LISA/MMR command lines ("||"-joined sub-dataset names)
DEFAULT_FAMILY_DATA: dict[str, str] = {
    "sem_seg": "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
    "refer_seg": "refclef||refcoco||refcoco+||refcocog",
    "vqa": "llava_instruct_150k",
    "reason_seg": "ReasonSeg|train",
    "multi_part_reason_seg": "MMR_train.json",
    "custom": "",  # your own files: FILE[@IMAGE_ROOT][:WEIGHT] ("utils.datasets.custom")
    # LaSagnA's --sem_seg_data default less openimage ("utils.datasets.lasagna_sem_seg")
    "lasagna_sem_seg": "cocostuff||ade20k||mapillary||cityscapes",
}
# a source's share of its family's draws: its `weight` attribute when it has one (the custom
# family's files), else DEFAULT_SOURCE_WEIGHT (sub-datasets drawn uniformly, as LISA)
WEIGHT_ATTRIBUTE = "weight"
DEFAULT_SOURCE_WEIGHT = 1.0


@dataclass(frozen=True)
class DataConfig:
    """The training mix (train_ds.py flags; lists already split on "||" / ",").

    family_data: for each family, the names of its sub-datasets (`--sem_seg_data` etc.).
    num_all_classes: LaSagnA's class-list length (`--num_all_classes`, the lasagna_sem_seg
        family's).
    """

    dataset_dir: Path
    dataset: tuple[str, ...] = ("sem_seg", "refer_seg", "vqa", "reason_seg")
    sample_rates: tuple[float, ...] = (9, 3, 3, 1)
    family_data: dict[str, tuple[str, ...]] = field(default_factory=dict)
    options: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int = 0
    num_all_classes: int = DEFAULT_NUM_ALL_CLASSES


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


def build_family(config: DataConfig, family: str) -> list[Source]:
    """The sources of one `--dataset` family (its FAMILY_SETTINGS passed as keywords);
    DataError if it has none."""
    names = list(config.family_data.get(family, ()))
    settings = {name: getattr(config, name) for name in FAMILY_SETTINGS.get(family, ())}
    factory = family_factory(family)
    sources = factory(Path(config.dataset_dir), names, config.options, **settings)
    if not sources:
        raise DataError(config.dataset_dir, family, "no usable sub-dataset", f"names {names}")
    return sources


def build_sources(config: DataConfig) -> list[tuple[str, list[Source]]]:
    """(family, sources) for every `--dataset` family, in order; DataError if one is unusable."""
    check_rates(config.dataset, config.sample_rates)
    return [(family, build_family(config, family)) for family in config.dataset]


def check_single_source(config: DataConfig) -> None:
    """`--no_sampling` trains on one training set (GSVA data/dataset.py:265-266: "Only one
    dataset is allowed with the no-sampling strategy"; one sub-dataset asserted in
    data/refer_seg_dataset.py:122-123, silently the first in data/sem_seg_dataset.py:185-186):
    ValueError unless `--dataset` names one family and its `--<family>_data` one name."""
    if len(config.dataset) != 1:
        raise ValueError(
            f"--no_sampling makes one pass over one training set, but --dataset names "
            f"{len(config.dataset)} families {list(config.dataset)}; name exactly one"
        )
    [family] = config.dataset
    names = list(config.family_data.get(family, ()))
    if len(names) != 1:
        raise ValueError(
            f"--no_sampling makes one pass over one training set, but --{family}_data names "
            f"{len(names)} sub-datasets {names}; name exactly one"
        )


def build_full_pass_source(config: DataConfig) -> Source:
    """The one source `--no_sampling` walks (see `check_single_source`; `--sample_rates` is
    unused, as in GSVA)."""
    check_single_source(config)
    sources = build_family(config, config.dataset[0])
    if len(sources) != 1:
        names = [source.name for source in sources]
        raise ValueError(f"--no_sampling needs one training source but got {names}")
    return sources[0]


class SeededDataset(Dataset):
    """Items made from a generator seeded by (seed, epoch, index), with redraws.

    Subclasses say where an item's samples come from (`draws`). process: optional Sample -> item
    transform (tokenization, pixels); when it raises UnusableSample (e.g. every conversation
    longer than the limit), the next draw is used. skip_bad_samples (`--skip_bad_samples`): a
    record that fails to read (a DataError or another ValueError / OSError from the source or
    from `process`) is skipped and the next draw used, so the item stays a function of (seed,
    epoch, index); the item then carries the skips as its `skipped_samples` attribute ({source
    name: count}, empty when none), which the training loader sums per epoch. Without it such
    an error propagates. Seeding this way makes item `i` of epoch `e` the same sample whatever
    the number of loader workers or the order they ask in, and after a resume.
    """

    def __init__(
        self,
        seed: int = 0,
        process: Callable[[Sample], object] | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        self.seed = seed
        self.process = process
        self.skip_bad_samples = skip_bad_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples `__getitem__` returns (call on every rank)."""
        self.epoch = epoch

    def generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def draws(self, index: int, rng: np.random.Generator) -> Iterator[tuple[str, Draw]]:
        """(source name, a call that reads one sample) for item `index`: its first draw, then
        the redraws, endlessly."""
        raise NotImplementedError

    def __getitem__(self, index: int):
        rng = self.generator(index)
        skipped: Counter[str] = Counter()
        last_error: Exception | None = None
        for name, draw in islice(self.draws(index, rng), MAX_DRAWS):
            try:
                sample = draw()
                item = sample if self.process is None else self.process(sample)
            except UnusableSample as reason:
                LOGGER.info("drew another sample: %s", reason)
                continue
            except BAD_RECORD_ERRORS as error:
                if not self.skip_bad_samples:
                    raise
                skipped[name] += 1
                last_error = error
                LOGGER.warning("--skip_bad_samples: skipped a record of %s: %s", name, error)
                continue
            if self.skip_bad_samples:
                setattr(item, SKIPPED_ATTRIBUTE, dict(skipped))
            return item
        raise RuntimeError(
            f"{MAX_DRAWS} draws in a row gave unusable samples (item {index}); skipped bad "
            f"records: {dict(skipped) or 'none'}; last error: {last_error}"
        ) from last_error


class HybridDataset(SeededDataset):
    """`length` items per epoch, each drawn from the weighted mix: a family by rate, then a
    sub-dataset (`pick_source`: uniformly, or by the custom files' weights), then the source's
    own sampling.

    A draw that is unusable or (with skip_bad_samples) bad is replaced by another from the SAME
    family (sub-dataset again by `pick_source`), as the reference datasets redraw inside a family
    (e.g. GSVA data/refer_seg_dataset.py:158 `return self.__getitem__(0)`, which draws a new
    sub-dataset and image of the family): the family shares stay at the rates however often
    one family's samples are unusable. See `SeededDataset`.
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
        super().__init__(seed, process, skip_bad_samples)
        self.families = families
        self.probabilities = check_rates([name for name, _ in families], rates)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def draws(self, index: int, rng: np.random.Generator) -> Iterator[tuple[str, Draw]]:
        family = int(rng.choice(len(self.families), p=self.probabilities))
        sources = self.families[family][1]
        while True:
            source = sources[pick_source(sources, rng)]
            yield source.name, partial(source.sample, rng)


def source_weight(source: Source) -> float:
    """A source's share of its family's draws (`WEIGHT_ATTRIBUTE`, else the default)."""
    return float(getattr(source, WEIGHT_ATTRIBUTE, DEFAULT_SOURCE_WEIGHT))


def pick_source(sources: Sequence[Source], rng: np.random.Generator) -> int:
    """The index of the family's source to draw from: uniform (one integer drawn, as before
    weights existed, so the uniform families' draws are unchanged) unless the sources' weights
    differ, then by weight."""
    weights = np.array([source_weight(source) for source in sources])
    if np.all(weights == weights[0]):
        return int(rng.integers(len(sources)))
    return int(rng.choice(len(sources), p=weights / weights.sum()))


class FullPassDataset(SeededDataset):
    """GSVA's `--no_sampling`: every record of ONE source once per epoch.

    Item i of epoch e is record `order[i]` of a permutation seeded by (seed, e), built with the
    source's `sample_at` (its other random choices, e.g. which sentences, from the item's
    generator); `len` = the number of records. An unusable or (with skip_bad_samples) bad record
    is replaced by a random record of the same source (GSVA's `return self.__getitem__(0)`
    takes record 0 there, e.g. data/refer_seg_dataset.py:158). GSVA's own order is one fixed
    permutation (DeepSpeed's DistributedSampler, shuffled with seed 0, never `set_epoch`); here
    each epoch has its own. See `SeededDataset`.
    """

    def __init__(
        self,
        source: Source,
        seed: int = 0,
        process: Callable[[Sample], object] | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        if not callable(getattr(source, "sample_at", None)):
            raise TypeError(
                f"--no_sampling builds every record of {source.name}, which needs the "
                f"record-indexed sample_at(index, rng) that {type(source).__name__} lacks"
            )
        super().__init__(seed, process, skip_bad_samples)
        self.source = source
        self.order = self.epoch_order(self.epoch)

    def __len__(self) -> int:
        return len(self.source)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int [len]: the record of each item in `epoch`."""
        sequence = np.random.SeedSequence([self.seed, epoch], spawn_key=ORDER_SPAWN_KEY)
        return np.random.default_rng(sequence).permutation(len(self.source))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.order = self.epoch_order(epoch)

    def draws(self, index: int, rng: np.random.Generator) -> Iterator[tuple[str, Draw]]:
        yield self.source.name, partial(self.source.sample_at, int(self.order[index]), rng)
        while True:
            yield self.source.name, partial(self.source.sample, rng)


class FullPassBatchSampler(Sampler[list[int]]):
    """`--no_sampling`: rank r's micro-batches of positions 0..length-1, each position once per
    epoch over all ranks, and the same number of micro-batches on every rank (DeepSpeed's
    collectives need that).

    Rounds of world_size x batch_size consecutive positions give rank r the r-th batch_size of
    each. The last round's `rest` positions are split as evenly as possible between the ranks;
    when fewer than world_size are left they join the previous round's batches, one each.
    GSVA (DeepSpeed's DistributedSampler, drop_last False) instead pads the shards with repeated
    records. Positions are shuffled per epoch by `FullPassDataset`.
    """

    def __init__(self, length: int, rank: int, world_size: int, batch_size: int) -> None:
        self.batches = full_pass_batches(length, world_size, batch_size)[rank]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def full_pass_batches(length: int, world_size: int, batch_size: int) -> list[list[list[int]]]:
    """Per rank, its micro-batches (lists of positions) of one pass over `length` positions (see
    `FullPassBatchSampler`); ValueError when there are fewer positions than ranks."""
    if length < world_size:
        raise ValueError(
            f"--no_sampling: {length} training records cannot give each of {world_size} ranks "
            "a micro-batch"
        )
    round_size = world_size * batch_size
    full_rounds, rest = divmod(length, round_size)
    ranks = [
        [
            list(range(start + rank * batch_size, start + (rank + 1) * batch_size))
            for start in range(0, full_rounds * round_size, round_size)
        ]
        for rank in range(world_size)
    ]
    tail = np.arange(full_rounds * round_size, length)
    if rest >= world_size:
        for batches, chunk in zip(ranks, np.array_split(tail, world_size), strict=True):
            batches.append(chunk.tolist())
    else:  # fewer than world_size left (full_rounds >= 1 as length >= world_size)
        for batches, position in zip(ranks, tail.tolist(), strict=False):
            batches[-1].append(position)
    return ranks


def skipped_samples(item: object) -> dict[str, int] | None:
    """The bad records skipped while drawing `item` ({source name: count}), None when the mixer
    did not count (no --skip_bad_samples)."""
    counts = getattr(item, SKIPPED_ATTRIBUTE, None)
    return None if counts is None else dict(counts)
