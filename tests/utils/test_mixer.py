"""The training sets: the weighted mix's empirical rates, seeding by (seed, epoch, index),
redraws inside the family (the rates hold when a family is often unusable), GSVA's --no_sampling
full pass, and errors."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from utils.collate import AllConversationsDropped
from utils.datasets.base import DataError, Sample, UnusableSample
from utils.datasets.mixer import (
    MAX_DRAWS,
    DataConfig,
    FullPassDataset,
    HybridDataset,
    build_full_pass_source,
    check_rates,
    check_single_source,
    family_factory,
)


class FakeSource:
    """Returns a sample whose image path records the source and the record drawn."""

    def __init__(self, name: str, size: int = 100) -> None:
        self.name = name
        self.size = size

    def __len__(self) -> int:
        return self.size

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(self.size)), rng)

    def sample_at(self, record: int, rng: np.random.Generator) -> Sample:
        return Sample(
            image=np.zeros((2, 2, 3), np.uint8),
            conversations=[],
            masks=np.zeros((0, 2, 2), np.uint8),
            image_path=f"{self.name}/{record}",
            source=self.name,
        )

    def check(self, deep: bool = False):
        return iter(())


LISA_FAMILIES = {
    "sem_seg": ("ade20k", "cocostuff"),
    "refer_seg": ("refcoco",),
    "vqa": ("llava",),
    "reason_seg": ("ReasonSeg",),
}
FAMILY_OF = {name: family for family, names in LISA_FAMILIES.items() for name in names}


def lisa_mix(length: int, seed: int = 0, process=None) -> HybridDataset:
    families = [
        (family, [FakeSource(name) for name in names]) for family, names in LISA_FAMILIES.items()
    ]
    return HybridDataset(families, [9, 3, 3, 1], length=length, seed=seed, process=process)


def test_empirical_mix_matches_the_rates() -> None:
    dataset = lisa_mix(8000)
    counts = Counter(dataset[i].source for i in range(len(dataset)))
    shares = {
        "sem_seg": (counts["ade20k"] + counts["cocostuff"]) / 8000,
        "refer_seg": counts["refcoco"] / 8000,
        "vqa": counts["llava"] / 8000,
        "reason_seg": counts["ReasonSeg"] / 8000,
    }
    expected = {"sem_seg": 0.5625, "refer_seg": 0.1875, "vqa": 0.1875, "reason_seg": 0.0625}
    for family, share in shares.items():
        assert share == pytest.approx(expected[family], abs=0.02), family
    # sub-datasets of a family are picked uniformly
    assert counts["ade20k"] / (counts["ade20k"] + counts["cocostuff"]) == pytest.approx(
        0.5, abs=0.04
    )


def test_items_depend_only_on_seed_epoch_and_index() -> None:
    dataset = lisa_mix(50)
    forward = [dataset[i].image_path for i in range(50)]
    # another "worker" asking in another order gets the same items
    other = lisa_mix(50)
    order = np.random.default_rng(1).permutation(50)
    shuffled = {int(i): other[int(i)].image_path for i in order}
    assert [shuffled[i] for i in range(50)] == forward
    dataset.set_epoch(1)
    assert [dataset[i].image_path for i in range(50)] != forward
    dataset.set_epoch(0)
    assert [dataset[i].image_path for i in range(50)] == forward
    assert [lisa_mix(50, seed=1)[i].image_path for i in range(50)] != forward


def record_of(sample: Sample) -> int:
    return int(sample.image_path.rsplit("/", 1)[1])


def test_unusable_samples_are_redrawn_from_the_same_family_deterministically() -> None:
    rejected = []

    def process(sample: Sample):
        if sample.source == "ade20k" and record_of(sample) % 2:
            rejected.append(sample.image_path)
            raise UnusableSample(f"{sample.image_path}: too long")
        return sample.source

    families = [
        ("sem_seg", [FakeSource("ade20k"), FakeSource("cocostuff")]),
        ("vqa", [FakeSource("llava")]),
    ]
    dataset = HybridDataset(families, [1, 1], length=200, seed=3, process=process)
    items = [dataset[i] for i in range(200)]
    # the family of item i is the first draw of its generator (an independent composition)
    chosen = [
        ["sem_seg", "vqa"][int(np.random.default_rng([3, 0, i]).choice(2, p=[0.5, 0.5]))]
        for i in range(200)
    ]
    assert rejected
    assert [{"ade20k": "sem_seg", "cocostuff": "sem_seg", "llava": "vqa"}[s] for s in items] == (
        chosen
    )
    assert items == [dataset[i] for i in range(200)]
    # an item of a family whose samples are never usable stops with a clear error instead of
    # taking another family's sample
    never = HybridDataset(families, [1, 1], length=200, seed=3, process=reject_sem_seg)
    first_sem_seg, first_vqa = chosen.index("sem_seg"), chosen.index("vqa")
    with pytest.raises(RuntimeError, match=f"{MAX_DRAWS} draws in a row gave unusable samples"):
        never[first_sem_seg]
    assert never[first_vqa].source == "llava"


def reject_sem_seg(sample: Sample) -> Sample:
    if sample.source in ("ade20k", "cocostuff"):
        raise UnusableSample(f"{sample.image_path}: too long")
    return sample


def test_family_shares_stay_at_the_rates_when_a_family_is_often_unusable() -> None:
    """Half the vqa samples have only too-long conversations (AllConversationsDropped under
    --too_long drop). Redrawing by rate would cut vqa's share from 3/16 to
    (3/16 * 1/2) / (1 - 3/16 * 1/2) = 0.103; redrawing inside the family keeps every share p
    within 4 binomial standard deviations sqrt(p (1 - p) / N) of the rate."""
    dropped = Counter()

    def process(sample: Sample) -> str:
        if sample.source == "llava" and record_of(sample) % 2:
            dropped[sample.source] += 1
            raise AllConversationsDropped(f"{sample.image_path}: all conversations too long")
        return sample.source

    draws = 4000
    dataset = lisa_mix(draws, seed=7, process=process)
    counts = Counter(FAMILY_OF[dataset[i]] for i in range(draws))
    rates = {"sem_seg": 9 / 16, "refer_seg": 3 / 16, "vqa": 3 / 16, "reason_seg": 1 / 16}
    for family, rate in rates.items():
        tolerance = 4 * math.sqrt(rate * (1 - rate) / draws)
        assert abs(counts[family] / draws - rate) < tolerance, (family, counts)
    # about as many vqa draws were dropped as vqa items were kept
    assert dropped["llava"] > counts["vqa"] / 2
    assert abs(0.103 - rates["vqa"]) > 10 * math.sqrt(rates["vqa"] * (1 - rates["vqa"]) / draws)


# --- GSVA --no_sampling: one pass over one source ---
def test_full_pass_visits_every_record_once_per_epoch_in_a_seeded_order() -> None:
    dataset = FullPassDataset(FakeSource("refcoco", size=37), seed=5)
    assert len(dataset) == 37
    epochs = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        records = [record_of(dataset[i]) for i in range(len(dataset))]
        assert sorted(records) == list(range(37))
        epochs.append(records)
    assert epochs[0] != epochs[1] != epochs[2]
    again = FullPassDataset(FakeSource("refcoco", size=37), seed=5)
    again.set_epoch(1)
    order = np.random.default_rng(0).permutation(37)  # workers asking in any order
    assert {int(i): record_of(again[int(i)]) for i in order} == dict(enumerate(epochs[1]))
    other_seed = FullPassDataset(FakeSource("refcoco", size=37), seed=6)
    assert [record_of(other_seed[i]) for i in range(37)] != epochs[0]


def test_full_pass_replaces_an_unusable_record_from_the_same_source() -> None:
    def process(sample: Sample) -> int:
        if record_of(sample) == 0:
            raise AllConversationsDropped("record 0: all conversations too long")
        return record_of(sample)

    dataset = FullPassDataset(FakeSource("llava", size=10), process=process)
    records = [dataset[i] for i in range(10)]
    assert 0 not in records and len(set(records)) == 9  # one record stands in for record 0
    assert records == [dataset[i] for i in range(10)]


def test_full_pass_needs_one_record_indexed_source() -> None:
    class Unindexed:
        name = "sem_seg/ade20k"

        def __len__(self) -> int:
            return 3

    with pytest.raises(TypeError, match=r"every record of sem_seg/ade20k.*sample_at"):
        FullPassDataset(Unindexed())
    two_families = DataConfig(Path("."), dataset=("refer_seg", "vqa"), sample_rates=(1, 1))
    with pytest.raises(ValueError, match=r"--dataset names 2 families \['refer_seg', 'vqa'\]"):
        check_single_source(two_families)
    two_names = DataConfig(
        Path("."), ("refer_seg",), (9, 3, 3, 1), {"refer_seg": ("refcoco", "grefcoco")}
    )
    with pytest.raises(ValueError, match=r"--refer_seg_data names 2 sub-datasets"):
        build_full_pass_source(two_names)
    # one family and one name pass the check; --sample_rates is not used (as in GSVA)
    missing = DataConfig(Path("/nonexistent"), ("vqa",), (9, 3, 3, 1), {"vqa": ("llava",)})
    with pytest.raises(DataError, match="llava"):
        build_full_pass_source(missing)


def test_rate_and_family_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"--sample_rates has 3 values .* --dataset names 4"):
        check_rates(["sem_seg", "refer_seg", "vqa", "reason_seg"], [9, 3, 3])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        check_rates(["a", "b"], [0, 0])
    with pytest.raises(ValueError, match=r"unknown --dataset family 'sem_seg2'; known: \["):
        family_factory("sem_seg2")


class WeightedSource(FakeSource):
    """A FakeSource with a share of its family's draws (as the custom family's files)."""

    def __init__(self, name: str, weight: float) -> None:
        super().__init__(name)
        self.weight = weight


def test_a_familys_sources_are_drawn_by_their_weights() -> None:
    families = [("custom", [WeightedSource("a", 3), WeightedSource("b", 1)])]
    mix = HybridDataset(families, [1], length=4000, seed=0)
    drawn = Counter(mix[i].source for i in range(len(mix)))
    assert drawn["a"] / len(mix) == pytest.approx(0.75, abs=0.03)


def test_custom_is_a_family() -> None:
    from utils.datasets.custom import build_custom_sources

    assert family_factory("custom") is build_custom_sources
