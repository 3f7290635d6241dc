"""Reader of REFER-format referring datasets (refCLEF, refCOCO, refCOCO+, refCOCOg, gRefCOCO,
RefZOM): a refs file (pickle or json list of refs) plus a COCO-style `instances.json`.

RefZOM (GSVA `data/refzom.py`): `refer_seg/refzom/Ref_ZOM.p` + `instances.json`, splits "train"
and "test", `ann_id` a list, `[]` for a no-target ref; its images are read from the COCO
train2014 folder as GSVA does (`data/dataset.py:336-342`), so Ref-ZOM's val2014 images must be
placed there too. GSVA names its validation entry "refzom|final|test"; "final" is the splitBy
it passes (and ignores), so it is this dataset's only splitBy here.

Shared by the training sources (`utils.datasets.refer_seg`) and the validation sets
(`utils.datasets.validation`); masks are decoded by `utils.datasets.coco`. Opening an index reads
only the annotation files; images and masks are decoded on demand. Everything lives under
`<dataset_dir>/refer_seg/` (the layout training uses; LISA's validation looked directly under
`<dataset_dir>`, which we do not copy).

Refs files come as pickles (`refs(unc).p`, `grefs(unc).p`, `Ref_ZOM.p`) or JSON. A pickle can run
code when loaded, so pickles are read by `utils.datasets.safe_pickle`, which builds plain data
only and refuses (naming the file and what it would build) any file that would build an object;
they are also read only from inside `--dataset_dir`. `tools/convert_refs.py` writes each
pickle's JSON twin beside it (same name, `.json`): when the twin exists it is read and the
pickle is never opened, so if the two disagree the JSON wins (`tools/convert_refs.py --check`
reports a disagreement). gRefCOCO ships `grefs(unc).json` itself. Paths the refs name are
resolved inside their dataset root or rejected.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    DataError,
    is_inside,
    normalised,
    read_image,
    read_json,
    resolve_inside,
)
from utils.datasets.coco import check_segmentation, decode_segmentation
from utils.datasets.safe_pickle import read_plain_pickle

REFER_ROOT = "refer_seg"
COCO_TRAIN2014 = "refer_seg/images/mscoco/images/train2014"
SAIAPR_IMAGES = "refer_seg/images/saiapr_tc-12"
# gRefCOCO writes the empty target as ann_id [-1] (RefZOM as []).
NO_TARGET_ANN_ID = -1
TRAIN_SPLIT = "train"
REDOWNLOAD = "re-download it"
SPLIT_BY_PATTERN = re.compile(r"[A-Za-z0-9_]*")  # "unc", "umd", "google"; "" = the default

# dataset -> (default splitBy, image folder relative to --dataset_dir)
REFER_DATASETS: dict[str, tuple[str, str]] = {
    "refclef": ("unc", SAIAPR_IMAGES),
    "refcoco": ("unc", COCO_TRAIN2014),
    "refcoco+": ("unc", COCO_TRAIN2014),
    "refcocog": ("umd", COCO_TRAIN2014),
    "grefcoco": ("unc", COCO_TRAIN2014),
    "refzom": ("final", COCO_TRAIN2014),
}
REFZOM_REFS = "Ref_ZOM.p"
JSON_SUFFIX, PICKLE_SUFFIX = ".json", ".p"
# datasets whose download is the JSON refs file (gRefCOCO); the others ship the pickle
SHIPPED_AS_JSON = frozenset({"grefcoco"})
CONVERT_TOOL = "tools/convert_refs.py"


@dataclass(frozen=True)
class Ref:
    """One referring record: every sentence refers to the union of `ann_ids` (empty: no target)."""

    ref_id: int | str
    image_id: int
    ann_ids: tuple[int, ...]
    split: str
    sentences: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"ref_id {self.ref_id}"


def refs_pickle_name(dataset: str, split_by: str) -> str:
    """The name of a dataset's pickled refs file ("refs(unc).p", "grefs(unc).p", "Ref_ZOM.p")."""
    if dataset == "grefcoco":
        return f"grefs({split_by}){PICKLE_SUFFIX}"
    if dataset == "refzom":
        return REFZOM_REFS
    return f"refs({split_by}){PICKLE_SUFFIX}"


def json_twin(path: Path) -> Path:
    """The JSON twin of a refs pickle: the same name with `.json` ("refs(unc).json")."""
    return path.with_suffix(JSON_SUFFIX)


def refs_file_candidates(dataset: str, split_by: str) -> list[str]:
    """File names a dataset's refs may have, in order of preference: the JSON twin, the pickle."""
    pickle_name = refs_pickle_name(dataset, split_by)
    return [json_twin(Path(pickle_name)).name, pickle_name]


def convert_command(dataset_dir: Path) -> str:
    """The command line that writes the JSON twins of `dataset_dir`'s refs pickles."""
    return f"python {CONVERT_TOOL} --dataset_dir {dataset_dir}"


def normalised_sentence(sent: str) -> str:
    """A referring sentence as LISA, MMR and GSVA read it for evaluation: `strip().lower()`
    (LISA `utils/dataset.py:372`, MMR `utils/dataset.py:437,472`, GSVA `data/dataset.py:398`)."""
    return sent.strip().lower()


def read_refs_pickle(path: Path, dataset_dir: Path) -> object:
    """The plain data of a refs pickle inside `dataset_dir`. DataError if it lies elsewhere or
    is damaged; `UnsafePickleError` (nothing built) if it would build any object."""
    if not is_inside(dataset_dir, path):
        raise DataError(
            path,
            None,
            f"refusing to unpickle a file outside --dataset_dir {normalised(dataset_dir)}",
            "refs pickles are only read from inside --dataset_dir; put the dataset there",
        )
    refused = (
        f"re-download it from the dataset's source; then `{convert_command(dataset_dir)}` "
        f"writes its JSON twin {json_twin(path).name} beside it, which is read instead"
    )
    return read_plain_pickle(path, refused, REDOWNLOAD)


def _load_refs(path: Path, dataset_dir: Path) -> list:
    if path.suffix == JSON_SUFFIX:
        pickled = path.with_suffix(PICKLE_SUFFIX)
        hint = REDOWNLOAD
        if pickled.is_file():
            rewrite = f"`{convert_command(dataset_dir)}` rewrites it from {pickled.name}"
            hint = f"delete it; {rewrite}"
        refs = read_json(path, hint)
    else:
        refs = read_refs_pickle(path, dataset_dir)
    if not isinstance(refs, list):
        raise DataError(path, None, f"holds a {type(refs).__name__}, expected a list of refs")
    if not refs:
        raise DataError(path, None, "holds no refs", "the file is empty; " + REDOWNLOAD)
    return refs


def _load_instances(path: Path) -> dict:
    instances = read_json(path, f"expected the COCO instances file {path}")
    keys = ("images", "annotations")
    if not isinstance(instances, dict) or not all(
        isinstance(instances.get(key), list) for key in keys
    ):
        raise DataError(path, None, "expected a JSON object with 'images' and 'annotations' lists")
    if not instances["images"] or not instances["annotations"]:
        raise DataError(path, None, "has no images or no annotations", REDOWNLOAD)
    return instances


def _ann_ids(raw: dict, file: Path, label: str) -> tuple[int, ...]:
    """`ann_id` as a tuple: int -> (id,); gRefCOCO list; [-1] or [] (no target) -> (). A ref
    marked `no_target` whose ann_id names annotations is a DataError."""
    ann_id = raw["ann_id"]
    ids = list(ann_id) if isinstance(ann_id, list | tuple) else [ann_id]
    if ids in ([NO_TARGET_ANN_ID], []):
        return ()
    if raw.get("no_target"):
        # which one is wrong cannot be told: an empty mask could silently be a wrong one
        raise DataError(
            file,
            label,
            f"no_target is true but ann_id {ann_id!r} names annotations",
            f"a no-target expression has ann_id [{NO_TARGET_ANN_ID}]; fix one of the two fields",
        )
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise DataError(file, label, f"ann_id {ann_id!r} is not an annotation id or a list of them")
    return tuple(ids)


def parse_ref(raw: object, position: int, file: Path) -> Ref:
    """One raw ref as a `Ref`; DataError naming the missing or malformed field."""
    if not isinstance(raw, dict):
        raise DataError(file, f"refs[{position}]", "is not a dict")
    label = f"ref_id {raw['ref_id']}" if "ref_id" in raw else f"refs[{position}]"
    missing = [
        key for key in ("ref_id", "image_id", "ann_id", "split", "sentences") if key not in raw
    ]
    if missing:
        raise DataError(file, label, f"missing required field(s) {missing}")
    sentences = raw["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise DataError(file, label, "'sentences' is not a non-empty list")
    if not all(isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sentences):
        raise DataError(file, label, "a sentence lacks its 'sent' string")
    return Ref(
        raw["ref_id"],
        raw["image_id"],
        _ann_ids(raw, file, label),
        str(raw["split"]),
        tuple(s["sent"] for s in sentences),
    )


class ReferIndex:
    """The refs and instances of one referring dataset, indexed by image and annotation id.

    refs: every well-formed ref (all splits); problems: DataErrors for instances.json entries that
    could not be indexed, ref_problems: (split, DataError) for refs that could not be (both
    reported by `check`; the validation sets refuse to run with unreadable refs of their split).
    """

    def __init__(
        self, refs_file: Path, instances_file: Path, image_dir: Path, dataset_dir: Path
    ) -> None:
        if not refs_file.is_file():
            raise DataError(
                refs_file, None, "does not exist", f"expected the refs file {refs_file}"
            )
        self.refs_file, self.instances_file, self.image_dir = refs_file, instances_file, image_dir
        raw_refs = _load_refs(refs_file, dataset_dir)
        instances = _load_instances(instances_file)
        self.problems: list[DataError] = []
        self.images = self._by_id(instances["images"], ("id", "file_name", "height", "width"))
        self.annotations = self._by_id(instances["annotations"], ("id", "segmentation"))
        self.refs: list[Ref] = []
        self.ref_problems: list[tuple[object, DataError]] = []
        for position, raw in enumerate(raw_refs):
            try:
                self.refs.append(parse_ref(raw, position, refs_file))
            except DataError as error:
                split = raw.get("split") if isinstance(raw, dict) else None
                self.ref_problems.append((split, error))

    def _by_id(self, entries: list, required: tuple[str, ...]) -> dict[int, dict]:
        table = {}
        for position, entry in enumerate(entries):
            if isinstance(entry, dict) and all(key in entry for key in required):
                table[entry["id"]] = entry
            else:
                self.problems.append(
                    DataError(self.instances_file, f"entry {position}", f"lacks one of {required}")
                )
        return table

    def unreadable_refs(self, split: str | None) -> list[DataError]:
        """Why refs of `split` (None: any split) could not be indexed; refs whose split cannot
        be read count for every split. Such refs are left out of `refs`."""
        return [
            error
            for ref_split, error in self.ref_problems
            if split is None or ref_split is None or ref_split == split
        ]

    def refs_by_image(self, split: str) -> dict[int, list[Ref]]:
        """Refs of `split` grouped by image id, in file order; DataError listing the splits
        found if `split` has no ref."""
        grouped: dict[int, list[Ref]] = {}
        for ref in self.refs:
            if ref.split == split:
                grouped.setdefault(ref.image_id, []).append(ref)
        if not grouped:
            raise DataError(
                self.refs_file,
                None,
                f"has no refs in split {split!r}",
                f"splits found: {self.splits()}",
            )
        return grouped

    def splits(self) -> list[str]:
        return sorted({ref.split for ref in self.refs})

    def image_shape(self, image_id: int, record: object) -> tuple[int, int]:
        if image_id not in self.images:
            raise DataError(self.refs_file, record, f"image_id {image_id} is not in instances.json")
        info = self.images[image_id]
        return int(info["height"]), int(info["width"])

    def image_path(self, image_id: int, record: object) -> Path:
        self.image_shape(image_id, record)
        return resolve_inside(
            self.image_dir, self.images[image_id]["file_name"], self.refs_file, record
        )

    def read_image(self, image_id: int, record: object) -> tuple[np.ndarray, Path]:
        """uint8 RGB [H, W, 3] and its path; DataError if its size differs from instances.json."""
        path = self.image_path(image_id, record)
        image = read_image(path, self.refs_file, record)
        shape = self.image_shape(image_id, record)
        if image.shape[:2] != shape:
            raise DataError(
                self.refs_file,
                record,
                f"image {path} is {image.shape[1]}x"
                f"{image.shape[0]} but instances.json says {shape[1]}x{shape[0]}",
            )
        return image, path

    def ref_mask(self, ref: Ref) -> np.ndarray | None:
        """uint8 [H, W] union of the ref's annotations; None for a no-target ref."""
        if not ref.ann_ids:
            return None
        shape = self.image_shape(ref.image_id, ref.label)
        union = None
        for ann_id in ref.ann_ids:
            if ann_id not in self.annotations:
                raise DataError(
                    self.refs_file,
                    ref.label,
                    f"ann_id {ann_id} is not in {self.instances_file.name}",
                )
            record = f"{ref.label}, annotation id {ann_id}"
            segmentation = self.annotations[ann_id]["segmentation"]
            mask = decode_segmentation(segmentation, shape, self.instances_file, record)
            # each decoded mask is a new array: the first one holds the union
            union = mask if union is None else np.bitwise_or(union, mask, out=union)
        return union

    def check(self, split: str | None, deep: bool = False) -> Iterator[DataError]:
        """Every bad record of `split` (None: all splits): instances.json entries and refs that
        could not be indexed, then the refs' images and annotations."""
        yield from self.problems
        yield from self.unreadable_refs(split)
        seen_images: set[int] = set()
        for ref in self.refs:
            if split is None or ref.split == split:
                yield from self._check_ref(ref, seen_images, deep)

    def _check_ref(self, ref: Ref, seen_images: set[int], deep: bool) -> Iterator[DataError]:
        try:
            shape = self.image_shape(ref.image_id, ref.label)
            if ref.image_id not in seen_images:
                seen_images.add(ref.image_id)
                path = self.image_path(ref.image_id, ref.label)
                if deep:
                    self.read_image(ref.image_id, ref.label)
                elif not path.is_file():
                    yield DataError(self.refs_file, ref.label, f"image {path} does not exist")
        except DataError as error:
            yield error
            if ref.image_id not in self.images:  # without its size no mask can be checked
                return
        for ann_id in ref.ann_ids:
            yield from self._check_annotation(ref, ann_id, shape, deep)

    def _check_annotation(
        self, ref: Ref, ann_id: int, shape: tuple[int, int], deep: bool
    ) -> Iterator[DataError]:
        if ann_id not in self.annotations:
            message = f"ann_id {ann_id} is not in {self.instances_file.name}"
            yield DataError(self.refs_file, ref.label, message)
            return
        segmentation = self.annotations[ann_id]["segmentation"]
        record = f"{ref.label}, annotation id {ann_id}"
        yield from check_segmentation(segmentation, shape, self.instances_file, record, deep)


def open_refer_index(dataset_dir: str | Path, dataset: str, split_by: str = "") -> ReferIndex:
    """The index of `refer_seg/<dataset>/` with its default splitBy unless `split_by` is given.

    Raises ValueError for an unknown dataset, DataError naming the expected files when missing.
    """
    if dataset not in REFER_DATASETS:
        raise ValueError(f"unknown referring dataset {dataset!r}; known: {sorted(REFER_DATASETS)}")
    if not SPLIT_BY_PATTERN.fullmatch(split_by):
        raise ValueError(f"splitBy {split_by!r} of {dataset} is not a name such as 'unc'")
    default_split_by, image_dir = REFER_DATASETS[dataset]
    directory = Path(dataset_dir) / REFER_ROOT / dataset
    candidates = [
        directory / name for name in refs_file_candidates(dataset, split_by or default_split_by)
    ]
    refs_file = next((path for path in candidates if path.is_file()), None)
    if refs_file is None:
        names = " or ".join(path.name for path in candidates)
        hint = f"expected {names} beside instances.json in <dataset_dir>/{REFER_ROOT}/{dataset}/"
        shipped = candidates[0] if dataset in SHIPPED_AS_JSON else candidates[-1]
        raise DataError(shipped, None, "does not exist", hint)
    return ReferIndex(
        refs_file, directory / "instances.json", Path(dataset_dir) / image_dir, Path(dataset_dir)
    )
