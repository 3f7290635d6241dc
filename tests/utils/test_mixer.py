"""The weighted mixer: empirical rates, seeding by (seed, epoch, index), resampling, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from utils.datasets.base import Sample, UnusableSample
from utils.datasets.mixer import HybridDataset, check_rates, family_factory


class FakeSource:
    """Returns a sample whose image path records the source and the record drawn."""

    def __init__(self, name: str, size: int = 100) -> None:
        self.name = name
        self.size = size

    def __len__(self) -> int:
        return self.size

    def sample(self, rng: np.random.Generator) -> Sample:
        record = int(rng.integers(self.size))
        return Sample(
            image=np.zeros((2, 2, 3), np.uint8),
            conversations=[],
            masks=np.zeros((0, 2, 2), np.uint8),
            image_path=f"{self.name}/{record}",
            source=self.name,
        )

    def check(self, deep: bool = False):
        return iter(())


def lisa_mix(length: int, seed: int = 0) -> HybridDataset:
    families = [
        ("sem_seg", [FakeSource("ade20k"), FakeSource("cocostuff")]),
        ("refer_seg", [FakeSource("refcoco")]),
        ("vqa", [FakeSource("llava")]),
        ("reason_seg", [FakeSource("ReasonSeg")]),
    ]
    return HybridDataset(families, [9, 3, 3, 1], length=length, seed=seed)


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


def test_unusable_samples_are_redrawn_deterministically() -> None:
    rejected = []

    def process(sample: Sample):
        if sample.source == "ade20k":
            rejected.append(sample.image_path)
            raise UnusableSample(f"{sample.image_path}: too long")
        return sample.image_path

    dataset = HybridDataset(
        [("sem_seg", [FakeSource("ade20k")]), ("vqa", [FakeSource("llava")])],
        [1, 1],
        length=40,
        process=process,
    )
    items = [dataset[i] for i in range(40)]
    assert rejected and all(item.startswith("llava/") for item in items)
    assert items == [dataset[i] for i in range(40)]


def test_rate_and_family_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"--sample_rates has 3 values .* --dataset names 4"):
        check_rates(["sem_seg", "refer_seg", "vqa", "reason_seg"], [9, 3, 3])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        check_rates(["a", "b"], [0, 0])
    with pytest.raises(ValueError, match=r"unknown --dataset family 'sem_seg2'; known: \["):
        family_factory("sem_seg2")
