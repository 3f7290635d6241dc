"""The semantic-segmentation validation sets LaSagnA's `test_sem.py` scores (congvvc/LaSagnA
@897cbbe `utils/test_sem_seg_dataset.py`), read from their real layouts under --dataset_dir.

A sample is an image, the set's whole class list in dataset order, the question(s) asking for it
(SEMANTIC_QUESTIONS[0], as LaSagnA's test) and the ground-truth label map: uint8 [H, W] of class
indices into that list, IGNORE_LABEL (255) where the annotation does not count. LaSagnA asks for
the whole list in one question (its chunking loop, `test_class_internal`, is commented out), so
the default `chunk_size` None does too (`--semantic_val_chunk 0`); a chunk size splits the list
into several questions in dataset order (for models whose context cannot hold 171 names).

Layouts (label maps listed, each with its image) and label values:
- `ade20k|val`: `ade20k/annotations/validation/*.png` (or `ADEChallengeData2016/`, the download's
  own folder name, which LaSagnA reads) with `images/validation/<stem>.jpg`; 150 classes of
  `ade20k_classes.json` (LISA's list, identical to LaSagnA's hard-coded ADE20K_classes);
  value 0 -> 255, v -> v - 1 (reduce-zero-label).
- `cocostuff|val`: `coco/panoptic_semseg_val2017/*.png` with `coco/val2017/<stem>.jpg`; 171
  classes of the shipped `cocostuff171_classes.json` (LaSagnA's COCO_CATEGORIES, suffixes
  stripped); value v < 171 is class v (the contiguous train ids of mmseg's labelTrainIds maps,
  as LaSagnA indexes `classes[value]`), 255 -> 255.
- `cityscapes|val`: `cityscapes/gtFine/val/<city>/*_gtFine_labelIds.png` with
  `leftImg8bit/val/<city>/*_leftImg8bit.png`; 19 classes from the `categories` of
  `gtFine/cityscapes_panoptic_val.json` when present (LaSagnA reads it; cityscapesScripts'
  createPanopticImgs writes it), else the shipped `cityscapes_classes.json` (the same list);
  a category's labelId -> its position, every other labelId (0..33) -> 255.
- `mapillary|val`: `mapillary/validation/v1.2/labels/*.png` with `validation/images/<stem>.jpg`
  (the v2.0 download's v1.2 annotations, palette PNGs read by index); 65 classes, the first 65
  `readable` names of `mapillary/config_v1.2.json`, lower-cased; v < 65 -> v, v >= 65 -> 255.

Differences from LaSagnA's reading, all deliberate: Cityscapes labelIds outside the 19 classes
(parking, rail track, guard rail, ...) are 255 here; LaSagnA sets only ids < 7 to 255 and leaves
the others in no class, which its scoring then counts as class 0 (road), as it does 255 pixels
(`--lasagna_miou_compat` reproduces both, because 255 becomes class 0 there). Mapillary: LaSagnA
reads `mapillary_vistas/validation/labels` (a v1.x download) with names from
`validation/panoptic/panoptic_2018.json` categories; the v2.0 download (our training layout, see
`utils.datasets.sem_seg`) carries the same v1.2 labels under `validation/v1.2/` and its names in
`config_v1.2.json` (66 labels, the last "Unlabeled"). Record order is sorted paths (LaSagnA lists
Cityscapes cities in `os.listdir` order and COCO with an unsorted glob).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from utils.datasets.base import (
    IGNORE_LABEL,
    DataError,
    check_image,
    read_image,
    read_json,
    read_label_map,
)
from utils.datasets.lasagna import semantic_question
from utils.datasets.sem_seg import (
    ADE20K_CLASSES_FILE,
    CLASS_LISTS,
    class_list,
    parse_ade20k_classes,
    stored_values,
)

SEMANTIC_VAL_SETS = ("ade20k", "cocostuff", "cityscapes", "mapillary")
SEMANTIC_VAL_SPLIT = "val"
ADE20K_ROOTS = ("ade20k", "ADEChallengeData2016")
ADE20K_OTHER = 0
COCOSTUFF_CLASSES_FILE = "cocostuff171_classes.json"
CITYSCAPES_PANOPTIC_JSON = "cityscapes_panoptic_val.json"
CITYSCAPES_CLASSES_FILE = "cityscapes_classes.json"
CITYSCAPES_MAX_LABEL_ID = 33  # cityscapesScripts labels.py: ids 0..33 (license plate -1 not drawn)
MAPILLARY_CONFIG = "mapillary/config_v1.2.json"
# LaSagnA test_sem.py: K per set
NUM_CLASSES = {"ade20k": 150, "cocostuff": 171, "cityscapes": 19, "mapillary": 65}


@dataclass(frozen=True)
class Vocabulary:
    """A set's classes: `names` in dataset order and `values[i]`, the label value of class i."""

    names: list[str]
    values: list[int]


@dataclass
class SemanticValSample:
    """One validation image. image: uint8 [H, W, 3] RGB; classes: the whole class list
    (dataset order); questions: one per chunk of it; label: uint8 [H, W] class indices into
    `classes`, IGNORE_LABEL where not scored."""

    image: np.ndarray
    classes: list[str]
    questions: list[str]
    label: np.ndarray
    image_path: str
    record_id: str


@dataclass(frozen=True)
class SemanticValSpec:
    """Where a set lives under its root folder and how its values read.

    labels: glob of the listed label maps; image_of(root, label path) -> image path;
    vocabulary(dataset_dir, root) -> Vocabulary; ignored(values) -> bool, the stored values
    that mean "not scored" (any other value must be a class's).
    """

    labels: str
    image_of: Callable[[Path, Path], Path]
    vocabulary: Callable[[Path, Path], Vocabulary]
    ignored: Callable[[np.ndarray], np.ndarray]


def _check_count(path: Path, dataset: str, names: list[str]) -> list[str]:
    expected = NUM_CLASSES[dataset]
    if len(names) != expected:
        raise DataError(path, None, f"holds {len(names)} class names, expected {expected}")
    return names


def ade20k_vocabulary(dataset_dir: Path, root: Path) -> Vocabulary:
    path = class_list(dataset_dir, "ade20k", ADE20K_CLASSES_FILE)
    names = _check_count(path, "ade20k", parse_ade20k_classes(path))
    return Vocabulary(names, [index + 1 for index in range(len(names))])


def parse_cocostuff_classes(path: Path) -> Vocabulary:
    """The 171 names of a json object {"names": [...]} (label value = list index)."""
    data = read_json(path, "a json object whose 'names' lists the 171 COCO-Stuff classes")
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DataError(path, None, "expected a json object with a 'names' list of strings")
    return Vocabulary(_check_count(path, "cocostuff", names), list(range(len(names))))


def cocostuff_vocabulary(dataset_dir: Path, root: Path) -> Vocabulary:
    """`<dataset_dir>/coco/cocostuff171_classes.json` if present, else the shipped list."""
    return parse_cocostuff_classes(class_list(dataset_dir, "coco", COCOSTUFF_CLASSES_FILE))


def parse_cityscapes_categories(path: Path) -> Vocabulary:
    """The `categories` (id, name) of a cityscapes_panoptic_val.json (or the shipped list)."""
    data = read_json(path, "expected cityscapesScripts' panoptic json with 'categories'")
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list):
        raise DataError(path, None, "missing the 'categories' list")
    names, values = [], []
    for index, category in enumerate(categories):
        ok = isinstance(category, dict) and isinstance(category.get("name"), str)
        if not ok or not isinstance(category.get("id"), int):
            raise DataError(path, f"categories[{index}]", "expected an int 'id' and a 'name'")
        if not 0 <= category["id"] <= CITYSCAPES_MAX_LABEL_ID:
            raise DataError(path, f"categories[{index}]", "id is not a labelId 0..33")
        names.append(category["name"].lower())
        values.append(category["id"])
    return Vocabulary(_check_count(path, "cityscapes", names), values)


def cityscapes_vocabulary(dataset_dir: Path, root: Path) -> Vocabulary:
    user = root / "gtFine" / CITYSCAPES_PANOPTIC_JSON
    return parse_cityscapes_categories(
        user if user.is_file() else CLASS_LISTS / CITYSCAPES_CLASSES_FILE
    )


def mapillary_vocabulary(dataset_dir: Path, root: Path) -> Vocabulary:
    """The first 65 `readable` names of config_v1.2.json, lower-cased (the 66th is
    "Unlabeled", value 65, not scored)."""
    path = dataset_dir / MAPILLARY_CONFIG
    config = read_json(path, "expected Mapillary Vistas' config_v1.2.json in --dataset_dir")
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or len(labels) < NUM_CLASSES["mapillary"]:
        count = len(labels) if isinstance(labels, list) else 0
        raise DataError(path, None, f"has {count} labels, expected at least 65")
    names = []
    for index, label in enumerate(labels[: NUM_CLASSES["mapillary"]]):
        if not isinstance(label, dict) or not isinstance(label.get("readable"), str):
            raise DataError(path, f"labels[{index}]", "missing the 'readable' name")
        names.append(label["readable"].lower())
    return Vocabulary(names, list(range(len(names))))


def _cityscapes_image(root: Path, label: Path) -> Path:
    """LaSagnA: path.replace('gtFine_labelIds', 'leftImg8bit').replace('gtFine', 'leftImg8bit')."""
    relative = label.relative_to(root / "gtFine")
    name = label.name.replace("gtFine_labelIds", "leftImg8bit")
    return root / "leftImg8bit" / relative.parent / name


SPECS = {
    "ade20k": SemanticValSpec(
        "annotations/validation/*.png",
        lambda root, label: root / "images" / "validation" / f"{label.stem}.jpg",
        ade20k_vocabulary,
        lambda values: (values == ADE20K_OTHER) | (values == IGNORE_LABEL),
    ),
    "cocostuff": SemanticValSpec(
        "panoptic_semseg_val2017/*.png",
        lambda root, label: root / "val2017" / f"{label.stem}.jpg",
        cocostuff_vocabulary,
        lambda values: values == IGNORE_LABEL,
    ),
    "cityscapes": SemanticValSpec(
        "gtFine/val/*/*_gtFine_labelIds.png",
        _cityscapes_image,
        cityscapes_vocabulary,
        lambda values: values <= CITYSCAPES_MAX_LABEL_ID,
    ),
    "mapillary": SemanticValSpec(
        "validation/v1.2/labels/*.png",
        lambda root, label: root / "validation" / "images" / f"{label.stem}.jpg",
        mapillary_vocabulary,
        lambda values: values >= NUM_CLASSES["mapillary"],
    ),
}
SHIPPED_COCOSTUFF_CLASSES = CLASS_LISTS / COCOSTUFF_CLASSES_FILE
SHIPPED_CITYSCAPES_CLASSES = CLASS_LISTS / CITYSCAPES_CLASSES_FILE
ROOTS = {
    "ade20k": ADE20K_ROOTS,
    "cocostuff": ("coco",),
    "cityscapes": ("cityscapes",),
    "mapillary": ("mapillary",),
}


def dataset_root(dataset_dir: Path, dataset: str) -> Path:
    """The set's folder: the first of its candidate names that exists (else the first)."""
    candidates = [dataset_dir / name for name in ROOTS[dataset]]
    return next((path for path in candidates if path.is_dir()), candidates[0])


def label_folder(dataset_dir: Path, dataset: str) -> str:
    """The set's label-map folder relative to `dataset_dir` (its glob up to the first
    wildcard), e.g. "coco/panoptic_semseg_val2017"."""
    root = dataset_root(Path(dataset_dir), dataset).relative_to(dataset_dir)
    parts = Path(SPECS[dataset].labels).parts
    first_wildcard = next(i for i, part in enumerate(parts) if "*" in part)
    return Path(root, *parts[:first_wildcard]).as_posix()


def class_chunks(classes: list[str], chunk_size: int | None) -> list[list[str]]:
    """The class list in one piece (None, LaSagnA) or in pieces of `chunk_size`, in order."""
    if chunk_size is None:
        return [classes]
    if chunk_size < 1:
        raise ValueError(f"the class chunk size must be at least 1, got {chunk_size}")
    return [classes[start : start + chunk_size] for start in range(0, len(classes), chunk_size)]


def class_positions(vocabulary: Vocabulary) -> dict[int, int]:
    """Stored label value -> class index (its position in the class list)."""
    return {value: index for index, value in enumerate(vocabulary.values)}


def known_values(
    values: np.ndarray,
    position: dict[int, int],
    ignored: Callable[[np.ndarray], np.ndarray],
    dataset: str,
    file: Path,
    record: str,
) -> np.ndarray:
    """bool [n]: which of a map's distinct stored `values` [n] are a class's; DataError naming
    the first one that is neither a class's nor an `ignored` one."""
    known = np.array([value in position for value in values.tolist()], dtype=bool)
    unknown = values[~known & ~ignored(values)]
    if unknown.size:
        raise DataError(
            file,
            record,
            f"label value {int(unknown[0])} is neither one of the {len(position)} "
            f"classes' values nor an ignored one ({dataset})",
        )
    return known


class LabelMapLayout(Protocol):
    """Where a set's records are: a glob of its label maps under the root, and each label
    map's image (SemanticValSpec, lasagna_sem_seg.LasagnaSpec)."""

    labels: str
    image_of: Callable[[Path, Path], Path]


class LabelMapRecords:
    """Records that are the label maps under `root` matching `spec.labels`, each paired with the
    image `spec.image_of` names (the validation sets here and LaSagnA's training sets).
    Subclasses set `root` and `spec`, then call `find_labels`."""

    root: Path
    spec: LabelMapLayout
    labels: list[Path]

    def find_labels(self, problem: str, hint: str) -> None:
        """List the label maps; a DataError naming the root when there are none."""
        self.labels = sorted(self.root.glob(self.spec.labels))
        if not self.labels:
            raise DataError(self.root, None, problem, hint)

    def __len__(self) -> int:
        return len(self.labels)

    def paths(self, index: int) -> tuple[Path, Path]:
        """(image, label map) of record `index`."""
        label = self.labels[index]
        return self.spec.image_of(self.root, label), label

    def record_id(self, index: int) -> str:
        """How errors name record `index` (its label map's stem)."""
        return self.paths(index)[1].stem

    def load(self, index: int) -> tuple:
        """(image, labels) of record `index`, decoded and checked (each subclass)."""
        raise NotImplementedError

    def check(self, deep: bool = False) -> Iterator[DataError]:
        """Every record: image and label map exist (deep: `load` it, which decodes both and
        checks their sizes and label values)."""
        for index in range(len(self)):
            image_path, label_path = self.paths(index)
            try:
                if deep:
                    self.load(index)
                    continue
                check_image(image_path, label_path, self.record_id(index), deep=False)
            except DataError as error:
                yield error


class SemanticValidation(LabelMapRecords):
    """One of the four sets ("<dataset>|val"): `len` images, `[i]` a SemanticValSample, and
    `check` for the dataset doctor."""

    def __init__(self, dataset_dir: str | Path, dataset: str, chunk_size: int | None = None):
        if dataset not in SPECS:
            raise ValueError(
                f"unknown semantic validation set {dataset!r}; known: {', '.join(SPECS)}"
            )
        self.name = f"{dataset}|{SEMANTIC_VAL_SPLIT}"
        self.dataset, self.spec = dataset, SPECS[dataset]
        self.root = dataset_root(Path(dataset_dir), dataset)
        self.vocabulary = self.spec.vocabulary(Path(dataset_dir), self.root)
        self.classes = self.vocabulary.names
        self.questions = [semantic_question(c) for c in class_chunks(self.classes, chunk_size)]
        hint = f"expected {self.root}/{self.spec.labels}"
        self.find_labels("holds no validation label maps", hint)

    def record_id(self, index: int) -> str:
        """How errors name record `index` (its image's stem)."""
        return self.paths(index)[0].stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], label uint8 [H, W] of class indices or 255); DataError when
        a stored value is neither a class's nor an ignored one, or the sizes differ."""
        image_path, label_path = self.paths(index)
        record = self.record_id(index)
        image = read_image(image_path, label_path, record)
        raw = read_label_map(label_path, image.shape[:2], label_path, record)
        return image, self.class_indices(raw, label_path, record)

    def class_indices(self, raw: np.ndarray, file: Path, record: str) -> np.ndarray:
        """Stored values [H, W] -> uint8 class indices (IGNORE_LABEL where ignored)."""
        values = stored_values(raw)
        position = class_positions(self.vocabulary)
        known = known_values(values, position, self.spec.ignored, self.dataset, file, record)
        lookup = np.full(int(values.max()) + 1, IGNORE_LABEL, dtype=np.uint8)
        for value in values[known].tolist():
            lookup[value] = position[value]
        return lookup[raw]

    def __getitem__(self, index: int) -> SemanticValSample:
        image, label = self.load(index)
        image_path = self.paths(index)[0]
        return SemanticValSample(
            image,
            list(self.classes),
            list(self.questions),
            label,
            str(image_path),
            self.record_id(index),
        )


def parse_semantic_val(entry: str) -> str:
    """ "ade20k|val" -> "ade20k"; ValueError naming the accepted entries otherwise."""
    dataset, _, split = entry.partition("|")
    if dataset not in SPECS or split != SEMANTIC_VAL_SPLIT:
        accepted = ", ".join(f"{name}|{SEMANTIC_VAL_SPLIT}" for name in SPECS)
        raise ValueError(f"unknown semantic validation set {entry!r}; accepted: {accepted}")
    return dataset
