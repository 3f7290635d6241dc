"""Referring-segmentation training sources: refCLEF, refCOCO, refCOCO+, refCOCOg and gRefCOCO.

Files (under `--dataset_dir`): `refer_seg/<name>/refs(unc).p` (refcocog: `refs(umd).p`; grefcoco:
`grefs(unc).json` or `.p`) and `refer_seg/<name>/instances.json`. Images:
`refer_seg/images/mscoco/images/train2014/<file_name>`; refclef:
`refer_seg/images/saiapr_tc-12/<file_name>` (its file names carry their `NN/images/` folder).

A sample is one training image (split "train") and up to `targets_to_draw(...)` of its
sentences, drawn without replacement over all sentences of all its refs (two sentences may name
the same object). Each sentence is a short-template target (LISA's choice, lower-cased as LISA
does); a gRefCOCO no-target sentence becomes a `[REJ]` target with an all-zero mask, a
multi-target one the union of its instances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from utils.datasets.base import DataError, Sample, SamplingOptions
from utils.datasets.refer import REFER_DATASETS, TRAIN_SPLIT, Ref, open_refer_index
from utils.datasets.sem_seg import finish_sample, target_count
from utils.datasets.templates import Target

FAMILY = "refer_seg"
# GSVA redraws samples whose every target is absent; bound the redraws so a dataset of only
# no-target refs still yields samples instead of looping forever.
MAX_ALL_REJECT_DRAWS = 8


class ReferSegSource:
    """Training source over the "train" refs of one referring dataset (see module docstring)."""

    def __init__(
        self, dataset_dir: Path, options: SamplingOptions, dataset: str = "refcoco"
    ) -> None:
        self.name = f"{FAMILY}/{dataset}"
        self.options = options
        self.index = open_refer_index(dataset_dir, dataset)
        self.refs_by_image = self.index.refs_by_image(TRAIN_SPLIT)
        self.image_ids = list(self.refs_by_image)

    def __len__(self) -> int:
        return len(self.image_ids)

    def heldout_image_ids(self) -> set[int]:
        """Images of this dataset's val/test refs."""
        return {ref.image_id for ref in self.index.refs if ref.split != TRAIN_SPLIT}

    def exclude_images(self, image_ids: set[int]) -> None:
        """Drop training images in `image_ids` (`--exclude_val`); DataError if none is left."""
        self.image_ids = [i for i in self.image_ids if i not in image_ids]
        if not self.image_ids:
            raise DataError(
                self.index.refs_file,
                None,
                "no training image is left after excluding the validation and test images",
            )

    def _draw(self, rng: np.random.Generator) -> tuple[int, list[tuple[str, Ref]]]:
        image_id = self.image_ids[int(rng.integers(len(self.image_ids)))]
        pairs = [(sent, ref) for ref in self.refs_by_image[image_id] for sent in ref.sentences]
        count = min(len(pairs), target_count(self.options))
        chosen = rng.choice(len(pairs), size=count, replace=False)
        return image_id, [pairs[int(i)] for i in chosen]

    def sample(self, rng: np.random.Generator) -> Sample:
        """One image with its drawn sentences as conversations; masks uint8 [k, H, W]."""
        for _ in range(MAX_ALL_REJECT_DRAWS):
            image_id, drawn = self._draw(rng)
            if self.options.prompt_style != "gsva" or any(ref.ann_ids for _, ref in drawn):
                break
        record = drawn[0][1].label
        image, path = self.index.read_image(image_id, record)
        masks: dict[int | str, np.ndarray | None] = {}
        targets = []
        for sent, ref in drawn:
            if ref.ref_id not in masks:
                masks[ref.ref_id] = self.index.ref_mask(ref)
            targets.append(Target(sent.strip().lower(), False, masks[ref.ref_id]))
        return finish_sample(image, targets, self.options, rng, path, self.name)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        """Every bad training record (see `ReferIndex.check`), without raising."""
        yield from self.index.check(TRAIN_SPLIT, deep)


def build_refer_seg_sources(
    dataset_dir: Path,
    names: Sequence[str] | str,
    options: SamplingOptions,
) -> list[ReferSegSource]:
    """One source per `--refer_seg_data` name ("refclef||refcoco" or a list of names).

    options.exclude_val: drop training images that any of the built datasets sharing the same
    image collection uses for val/test (the paper's protocol; LISA's flag did nothing).
    """
    if isinstance(names, str):
        names = [name for name in names.split("||") if name]
    unknown = [name for name in names if name not in REFER_DATASETS]
    if unknown:
        raise ValueError(
            f"unknown --refer_seg_data name(s) {unknown}; known: {', '.join(REFER_DATASETS)}"
        )
    sources = [ReferSegSource(Path(dataset_dir), options, name) for name in names]
    if options.exclude_val:
        _exclude_heldout(sources)
    return sources


def _exclude_heldout(sources: list[ReferSegSource]) -> None:
    by_images: dict[Path, set[int]] = {}
    for source in sources:
        by_images.setdefault(source.index.image_dir, set()).update(source.heldout_image_ids())
    for source in sources:
        source.exclude_images(by_images[source.index.image_dir])
