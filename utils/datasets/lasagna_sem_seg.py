"""LaSagnA's semantic-segmentation training family (`--dataset lasagna_sem_seg`, sub-datasets in
`--lasagna_sem_seg_data`): one class-sequence conversation per image over a closed-set label map
(`utils.datasets.lasagna`: `get_sample_classes`, `semantic_question`, canonical markers), the
k-th `[SEG]` / `[REJ]` with the k-th mask row (a present class's pixels, or all zeros).

LaSagnA `utils/sem_seg_dataset.py` (congvvc/LaSagnA @897cbbe) draws a sub-dataset of
`cocostuff||ade20k||mapillary||cityscapes||openimage` with the hard-coded weights 6, 3, 2, 2, 1
(`SemSegDataset.__getitem__`), then an image uniformly. Here each source carries its weight by
name (`SOURCE_WEIGHTS`), so a subset or another order keeps LaSagnA's relative weights; OpenImage
is not read (its mask json has no published builder, LaSagnA issue #2), so the four closed-set
sets share 6:3:2:2. A label map with no labelled pixel is redrawn (LaSagnA
`return self.__getitem__(0)`; the mixer draws again), as are records that fail with
`--skip_bad_samples`.

Layouts under --dataset_dir (each label map listed, sorted, with its image):
- `cocostuff`: LISA's stuffthingmaps, `cocostuff/train2017/<id>.png` with `coco/train2017/<id>.jpg`
  (LaSagnA's README layout; its code reads `coco/panoptic_semseg_train2017`, a train-id copy of
  the same maps). Classes: the 171 of `cocostuff171_classes.json` (LaSagnA's COCO_CATEGORIES,
  suffixes stripped); pixel v (COCO id - 1) is the class of its rank among the 171 used values
  (the 11 ids COCO never annotates are skipped), 255 ignored. Unlike LISA's sem_seg, the
  merged / "-other" stuff classes are classes (LaSagnA comments LISA's filter out).
- `ade20k`: `ade20k/` (or `ADEChallengeData2016/`, which LaSagnA's code reads)
  `annotations/training/*.png` with `images/training/<stem>.jpg`; 150 classes, 0 ignored,
  v -> v - 1.
- `mapillary`: the v2.0 download's v1.2 annotations, `mapillary/training/v1.2/labels/*.png` with
  `training/images/<key>.jpg`; 65 classes of `config_v1.2.json` (LaSagnA: v1.2 labels, names of
  `panoptic_2018.json`), 65 ("Unlabeled") ignored.
- `cityscapes`: `cityscapes/gtFine/train/<city>/*_gtFine_labelIds.png` with
  `leftImg8bit/train/<city>/*_leftImg8bit.png`; the 19 classes of
  `gtFine/cityscapes_panoptic_val.json` (else the shipped list), every other labelId ignored
  (LaSagnA sets ids < 7 to 255 and leaves the others in no class: their pixels are 0 in every
  mask, as "ignored" pixels are with the default `--ignore_pixels background`).

The vocabularies and ignore rules are the validation sets' (`utils.datasets.semantic_val`), so a
class is the same word in training and in `<set>|val`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    IGNORE_LABEL,
    DataError,
    Sample,
    SamplingOptions,
    Source,
    UnusableSample,
    check_record_index,
    read_image,
    read_label_map,
)
from utils.datasets.lasagna import DEFAULT_NUM_ALL_CLASSES, lasagna_sample, semantic_targets
from utils.datasets.sem_seg import LabelMap, read_cocostuff_classes, stored_values
from utils.datasets.semantic_val import (
    ADE20K_ROOTS,
    SPECS,
    LabelMapRecords,
    Vocabulary,
    ade20k_vocabulary,
    cityscapes_vocabulary,
    class_positions,
    cocostuff_vocabulary,
    known_values,
    mapillary_vocabulary,
)

FAMILY = "lasagna_sem_seg"
# LaSagnA sem_seg_dataset.py: sample_rate = [6, 3, 2, 2, 1] over its --sem_seg_data default
# cocostuff||ade20k||mapillary||cityscapes||openimage (openimage not read here)
SOURCE_WEIGHTS = {"cocostuff": 6.0, "ade20k": 3.0, "mapillary": 2.0, "cityscapes": 2.0}
NOT_READ = {"openimage": "OpenImage V6 is not read (no published builder of its mask json)"}
# stuffthingmaps values of the 11 COCO thing ids that have no annotation (street sign, hat, shoe,
# eye glasses, plate, mirror, window, desk, door, blender, hair brush): not among the 171
COCOSTUFF_UNUSED_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def cocostuff_train_vocabulary(dataset_dir: Path, root: Path) -> Vocabulary:
    """The 171 names with their stuffthingmaps values (every value of `cocostuff_classes.txt`
    but the unused ones, in order); DataError when the two lists disagree in length."""
    names = cocostuff_vocabulary(dataset_dir, root).names
    stored = len(read_cocostuff_classes(dataset_dir))
    values = [value for value in range(stored) if value not in COCOSTUFF_UNUSED_VALUES]
    if len(values) != len(names):
        raise DataError(
            dataset_dir / "cocostuff",
            None,
            f"cocostuff_classes.txt gives {len(values)} used values, expected {len(names)}",
        )
    return Vocabulary(names, values)


def cityscapes_image(root: Path, label: Path) -> Path:
    """`gtFine/<split>/<city>/<x>_gtFine_labelIds.png` ->
    `leftImg8bit/<split>/<city>/<x>_leftImg8bit.png` (LaSagnA init_cityscapes)."""
    relative = label.relative_to(root / "gtFine")
    name = label.name.replace("gtFine_labelIds", "leftImg8bit")
    return root / "leftImg8bit" / relative.parent / name


@dataclass(frozen=True)
class LasagnaSpec:
    """One training set: candidate root folders under --dataset_dir (the first that exists),
    the glob of its label maps under the root, image_of(root, label) -> image path,
    vocabulary(dataset_dir, root) and ignored(values) -> bool (stored values that are no class)."""

    roots: tuple[str, ...]
    labels: str
    image_of: Callable[[Path, Path], Path]
    vocabulary: Callable[[Path, Path], Vocabulary]
    ignored: Callable[[np.ndarray], np.ndarray]


SPECS_BY_NAME = {
    "cocostuff": LasagnaSpec(
        (".",),
        "cocostuff/train2017/*.png",
        lambda root, label: root / "coco" / "train2017" / f"{label.stem}.jpg",
        cocostuff_train_vocabulary,
        lambda values: values == IGNORE_LABEL,
    ),
    "ade20k": LasagnaSpec(
        ADE20K_ROOTS,
        "annotations/training/*.png",
        lambda root, label: root / "images" / "training" / f"{label.stem}.jpg",
        ade20k_vocabulary,
        SPECS["ade20k"].ignored,
    ),
    "mapillary": LasagnaSpec(
        ("mapillary",),
        "training/v1.2/labels/*.png",
        lambda root, label: root / "training" / "images" / f"{label.stem}.jpg",
        mapillary_vocabulary,
        SPECS["mapillary"].ignored,
    ),
    "cityscapes": LasagnaSpec(
        ("cityscapes",),
        "gtFine/train/*/*_gtFine_labelIds.png",
        cityscapes_image,
        cityscapes_vocabulary,
        SPECS["cityscapes"].ignored,
    ),
}


class LasagnaSemSegSource(LabelMapRecords):
    """One of LaSagnA's closed-set training sets: (image, label map) records, the set's class
    list, and its weight in the family (`SOURCE_WEIGHTS`)."""

    def __init__(
        self,
        dataset_dir: Path,
        options: SamplingOptions,
        dataset: str,
        num_all_classes: int = DEFAULT_NUM_ALL_CLASSES,
    ) -> None:
        self.name, self.dataset = f"{FAMILY}/{dataset}", dataset
        self.options, self.num_all_classes = options, num_all_classes
        self.weight = SOURCE_WEIGHTS[dataset]
        self.spec = SPECS_BY_NAME[dataset]
        root = Path(dataset_dir)
        candidates = [root / folder for folder in self.spec.roots]
        self.root = next((path for path in candidates if path.is_dir()), candidates[0])
        vocabulary = self.spec.vocabulary(root, self.root)
        self.classes = vocabulary.names
        self.position = class_positions(vocabulary)
        hint = f"LaSagnA's {dataset} training layout: {self.spec.labels} under it"
        self.find_labels("holds no training label maps", hint)

    def load(self, index: int) -> tuple[np.ndarray, LabelMap]:
        """(image uint8 [H, W, 3], its LabelMap of class indices into `classes`); DataError
        when a stored value is neither a class's nor an ignored one."""
        image_path, label_path = self.paths(index)
        record = label_path.stem
        image = read_image(image_path, label_path, record)
        raw = read_label_map(label_path, image.shape[:2], label_path, record)
        values = stored_values(raw)
        known_values(values, self.position, self.spec.ignored, self.dataset, label_path, record)
        labels = np.array(
            [self.position.get(value, IGNORE_LABEL) for value in values.tolist()], dtype=np.int64
        )
        return image, LabelMap(raw, values, labels)

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """The class-sequence conversation of map `index`, drawn from `rng`; UnusableSample
        when the map has no labelled pixel (LaSagnA draws another image)."""
        image, label = self.load(check_record_index(index, len(self), self.name))
        image_path, label_path = self.paths(index)
        if not label.present():
            raise UnusableSample(f"{self.name}: {label_path} has no labelled pixel")
        drawn = semantic_targets(
            self.dataset,
            self.classes,
            label,
            rng,
            self.num_all_classes,
            self.options.ignore_pixels,
        )
        return lasagna_sample(image, drawn, image_path, self.name)


def build_lasagna_sem_seg_sources(
    dataset_dir: str | Path,
    names: list[str],
    options: SamplingOptions,
    num_all_classes: int = DEFAULT_NUM_ALL_CLASSES,
) -> list[Source]:
    """One source per `--lasagna_sem_seg_data` name ("cocostuff||ade20k||..." split on "||")."""
    sources: list[Source] = []
    for name in names:
        if name not in SPECS_BY_NAME:
            reason = NOT_READ.get(name, "unknown")
            raise ValueError(
                f"--lasagna_sem_seg_data {name!r}: {reason}; known: {', '.join(SPECS_BY_NAME)}"
            )
        sources.append(LasagnaSemSegSource(Path(dataset_dir), options, name, num_all_classes))
    return sources
