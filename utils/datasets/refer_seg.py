"""Referring-segmentation training sources: refCLEF, refCOCO, refCOCO+, refCOCOg, gRefCOCO and
RefZOM (`--refer_seg_data` names; see `utils.datasets.refer` for the files).

Files (under `--dataset_dir`): `refer_seg/<name>/refs(unc).p` (refcocog: `refs(umd).p`; grefcoco:
`grefs(unc).json` or `.p`; refzom: `Ref_ZOM.p`) and `refer_seg/<name>/instances.json`. Images:
`refer_seg/images/mscoco/images/train2014/<file_name>`; refclef:
`refer_seg/images/saiapr_tc-12/<file_name>` (its file names carry their `NN/images/` folder).

A sample is one training image (split "train") and up to `targets_to_draw(...)` of its
sentences, drawn without replacement over all sentences of all its refs (two sentences may name
the same object). Each sentence (`strip()`ped, case kept: the templates lower-case it where
the references do) is a short-template target; a multi-target ref's mask is the union of its
instances. A target without pixels is answered as the references answer it:
- "gsva" style: `[REJ]` for every target whose mask is empty (GSVA
  `data/refer_seg_dataset.py:275`, `masks[t].sum() < 1`: no-target refs and empty masks alike).
  A sample whose every target is `[REJ]` is unusable (`UnusableSample`): GSVA `:280-281`
  `return self.__getitem__(0)` draws a new sub-dataset and image of the family, as the mixer
  does with it here (`--no_sampling`: a random record of the same source).
- "lisa" / "mmr" styles, a gRefCOCO / RefZOM no-target ref: `[REJ]` with an all-zero mask
  (`--no_target_answer rej`, the default) or, as LISA and MMR train gRefCOCO (`[-1]` -> zero
  mask, `[SEG]`; MMR `utils/refer_seg_dataset.py:249-256`), `[SEG]` with an all-zero mask
  (`--no_target_answer empty_seg`). A ref whose annotations decode to no pixels keeps `[SEG]`.
`--refer_draw varied` (ours, off in every recipe) draws 1 to `targets_to_draw(...)` sentences,
uniformly, and keeps a "gsva"-style sample whose every sentence is answered `[REJ]`: questions
about a single absent sentence, which the references' loaders never ask, are then trained.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    DataError,
    Sample,
    SamplingOptions,
    UnusableSample,
    check_record_index,
)
from utils.datasets.refer import REFER_DATASETS, TRAIN_SPLIT, Ref, open_refer_index
from utils.datasets.templates import Target, finish_sample, target_count

FAMILY = "refer_seg"
GSVA_STYLE = "gsva"
EMPTY_SEG = "empty_seg"
VARIED = "varied"


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

    def _draw(self, image_id: int, rng: np.random.Generator) -> list[tuple[str, Ref]]:
        """Up to `target_count` (sentence, ref) pairs of the image, without replacement
        ("varied" `refer_draw`: a count drawn uniformly from 1 to that)."""
        pairs = [(sent, ref) for ref in self.refs_by_image[image_id] for sent in ref.sentences]
        count = min(len(pairs), target_count(self.options))
        if self.options.refer_draw == VARIED:
            count = int(rng.integers(1, count + 1))
        chosen = rng.choice(len(pairs), size=count, replace=False)
        return [pairs[int(i)] for i in chosen]

    def _targets(self, drawn: list[tuple[str, Ref]]) -> list[Target]:
        """The drawn sentences as targets (mask None = answered `[REJ]`; module docstring);
        a ref drawn with two sentences is decoded once."""
        masks: dict[int | str, np.ndarray | None] = {}
        targets = []
        for sent, ref in drawn:
            if ref.ref_id not in masks:
                masks[ref.ref_id] = self.index.ref_mask(ref)
            mask = masks[ref.ref_id]
            if self.options.prompt_style == GSVA_STYLE:
                mask = mask if mask is not None and mask.any() else None
            elif mask is None and self.options.no_target_answer == EMPTY_SEG:
                shape = self.index.image_shape(ref.image_id, ref.label)
                mask = np.zeros(shape, np.uint8)
            targets.append(Target(sent.strip(), False, mask))
        return targets

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Training image `index` with its drawn sentences as conversations; masks uint8
        [k, H, W]. UnusableSample when the "gsva" style answers every drawn sentence `[REJ]`
        (kept with the "varied" `refer_draw`)."""
        image_id = self.image_ids[check_record_index(index, len(self), self.name)]
        drawn = self._draw(image_id, rng)
        targets = self._targets(drawn)
        redrawn = self.options.prompt_style == GSVA_STYLE and self.options.refer_draw != VARIED
        if redrawn and all(t.mask is None for t in targets):
            raise UnusableSample(
                f"{self.name}: every sentence drawn for image {image_id} is answered [REJ]"
            )
        image, path = self.index.read_image(image_id, drawn[0][1].label)
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
