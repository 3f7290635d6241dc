"""ReasonSeg (LISA's `reason_seg` task, `--reason_seg_data`) and its validation/test sets.

Layout: `reason_seg/<name>/<split>/<image>.jpg` beside `<image>.json` = `{text: [str], is_sentence,
shapes: [{label, points}]}` (UTF-8, some files cp1252), and `reason_seg/<name>/explanatory/
train.json` = `[{image, query, outputs}]`. "ReasonSeg|train_val" joins the splits train and val.

Query-type splits (the LISA paper's test columns "short query" / "long query"; the LISA README:
`is_sentence` says "whether the text instructions are long sentences"): "<splits>_short" keeps
the records whose `is_sentence` is false and "<splits>_long" those where it is true, e.g.
"ReasonSeg|test_short", "ReasonSeg|test_long", "ReasonSeg|val_long"; CoReS's README spelling
"testshort" / "testlong" means the same. A folder of exactly that name (`<name>/testshort/`), if
present, takes precedence and is read whole, as the LISA-family loaders glob it. No record of the
kind, or a json whose kind cannot be read (it would be left out silently), is a DataError.

Mask (LISA utils/data_processing.py): shapes labelled "flag" are skipped; a label containing
"ignore" (any case) paints IGNORE_LABEL, any other 1; polygons are drawn largest first so smaller
shapes win (ties: the earlier shape in the file). Training masks follow `--ignore_pixels`:
"background" (LISA, GSVA, MMR: `(mask == 1)` in utils/reason_seg_dataset.py) trains the ignore
regions as background (0); "exclude" keeps IGNORE_LABEL, which the loss leaves out. Validation
masks keep IGNORE_LABEL, which the metrics skip (LISA's `intersectionAndUnionGPU(...,
ignore_index=255)` in validate()).

Training: up to `num_classes_per_sample` of the image's texts, each its own LISA-style
conversation with one `[SEG]` and the same mask. For an image with an explanation (unless
`explanatory` < 0): with probability `explanatory` every answer is the explanation alone (no
`[SEG]`, no mask); otherwise 50/50 the plain form or "text + explanatory question" answered
"<[SEG] answer> <explanation>". The answers are LISA's, whatever `--prompt_style` (GSVA and MMR
keep LISA's ReasonSeg loader), except with "cores": CoReS's loader is LISA's with its own
ANSWER_LIST, so plain and explained answers are drawn from CORES_ANSWERS. Validation asks about
`text[0]` only and answers `--val_answer` (default "[SEG].", LISA's; CoReS's: "It usually
appears on [SEG_SEMA]. It is [SEG].").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.datasets.base import (
    IGNORE_LABEL,
    REPLACE_IMAGE,
    DataError,
    Sample,
    SamplingOptions,
    Source,
    ValidationSample,
    check_record_index,
    read_image,
    read_json,
    stack_masks,
)
from utils.datasets.templates import (
    CORES_STYLE,
    DEFAULT_VAL_ANSWER,
    EXPLANATORY_QUESTIONS,
    IMAGE_PREFIX,
    LISA_STYLE,
    Target,
    build_conversations,
    check_val_answer,
    choose,
    single_target_answers,
    validation_question,
)

MAX_NAMED = 5  # file names listed in one message
REASON_SEG_DIR = "reason_seg"
EXPLANATORY_JSON = "explanatory/train.json"
# Some ReasonSeg jsons were saved in Windows-1252; LISA falls back to it too.
ENCODINGS = ("utf-8", "cp1252")
FLAG_LABEL = "flag"  # deprecated shapes that mean nothing
IGNORE_MARK = "ignore"
TARGET_VALUE = 1
MIN_POLYGON_POINTS = 3
SPLIT_JOINER = "_"
# query-type suffix of a split name -> the `is_sentence` it keeps
QUERY_KINDS = {"short": False, "long": True}
# CoReS's README spelling -> ours
QUERY_SPLIT_ALIASES = {"testshort": "test_short", "testlong": "test_long"}
PLAIN, EXPLANATION_ONLY, EXPLAINED = "plain", "explanation_only", "explained"


@dataclass
class Annotation:
    """One ReasonSeg json. polygons: (label, int32 [n, 2] (x, y) points), "flag" ones removed."""

    texts: list[str]
    is_sentence: bool
    polygons: list[tuple[str, np.ndarray]]


def parse_spec(spec: str) -> tuple[str, str]:
    """ "ReasonSeg|train_val" -> ("ReasonSeg", "train_val")."""
    name, separator, splits = spec.partition("|")
    if not (name and separator and splits):
        raise ValueError(f"expected 'name|split[_split]' such as 'ReasonSeg|train', not {spec!r}")
    return name, splits


def query_split(splits: str) -> tuple[list[str], bool | None]:
    """(split folders, `is_sentence` to keep or None for every record): "train_val" ->
    (["train", "val"], None); "test_short" and "testshort" -> (["test"], False)."""
    folders = QUERY_SPLIT_ALIASES.get(splits, splits).split(SPLIT_JOINER)
    if len(folders) > 1 and folders[-1] in QUERY_KINDS:
        return folders[:-1], QUERY_KINDS[folders[-1]]
    return folders, None


def list_images(dataset_dir: Path, name: str, splits: list[str]) -> list[Path]:
    """The sorted `*.jpg` of each split folder; DataError if a folder is missing or empty."""
    images: list[Path] = []
    for split in splits:
        folder = dataset_dir / REASON_SEG_DIR / name / split
        hint = f"expected {REASON_SEG_DIR}/{name}/{split}/<image>.jpg + <image>.json"
        if not folder.is_dir():
            raise DataError(folder, None, "directory does not exist", hint)
        found = sorted(folder.glob("*.jpg"))
        if not found:
            raise DataError(folder, None, "has no *.jpg images", hint)
        check_images_present(folder)
        images.extend(found)
    return images


def check_images_present(folder: Path) -> None:
    """DataError naming the annotations of `folder` whose image is missing: the images are what
    is listed, so such a record would otherwise be left out without a word."""
    orphans = [p.name for p in sorted(folder.glob("*.json")) if not p.with_suffix(".jpg").is_file()]
    if orphans:
        shown = ", ".join(orphans[:MAX_NAMED]) + (", ..." if len(orphans) > MAX_NAMED else "")
        raise DataError(
            folder,
            None,
            f"{len(orphans)} annotation(s) without their .jpg image: {shown}",
            REPLACE_IMAGE,
        )


def select_images(dataset_dir: Path, spec: str) -> list[Path]:
    """The images of "name|splits" (module docstring): the split folders' images, only those of
    one query type for a "_short"/"_long" split unless a folder of that exact name exists."""
    name, splits = parse_spec(spec)
    folders, is_sentence = query_split(splits)
    if is_sentence is None or (dataset_dir / REASON_SEG_DIR / name / splits).is_dir():
        return list_images(dataset_dir, name, folders if is_sentence is None else [splits])
    images = list_images(dataset_dir, name, folders)
    kept = [path for path in images if query_is_sentence(path, spec) == is_sentence]
    if not kept:
        problem = (
            f"split(s) {', '.join(folders)} have no record with is_sentence "
            f"{str(is_sentence).lower()}, so {spec!r} is empty"
        )
        hint = f"all {len(images)} images are of the other query type"
        raise DataError(dataset_dir / REASON_SEG_DIR / name, None, problem, hint)
    return kept


def query_is_sentence(image_path: Path, spec: str) -> bool:
    """The `is_sentence` of an image's json; DataError if unreadable, since the record would
    silently be left out of both query types."""
    try:
        return read_annotation(image_path.with_suffix(".json"), image_path.name).is_sentence
    except DataError as error:
        hint = f"its query type is needed to select {spec!r}; tools/check_dataset.py lists all"
        raise DataError(error.file, error.record, error.problem, hint) from error


def polygon_points(points: object, file: Path, record: str) -> np.ndarray:
    """int32 [n, 2] points of a polygon (n >= 3), truncated like LISA's int32 cast."""
    if not isinstance(points, list):
        raise DataError(file, record, "missing field 'points' (a list of [x, y])")
    if len(points) < MIN_POLYGON_POINTS:
        raise DataError(file, record, f"polygon has {len(points)} points; at least 3 are needed")
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise DataError(file, record, "'points' is not a list of finite [x, y]")
    return array.astype(np.int32)


def read_annotation(path: Path, record: str) -> Annotation:
    """Parse and validate a ReasonSeg json; DataError naming `path` and `record` if malformed."""
    data = read_json(path, "every image needs a json of the same name", record, ENCODINGS)
    if not isinstance(data, dict):
        raise DataError(path, record, "expected a json object {text, is_sentence, shapes}")
    texts, is_sentence, shapes = data.get("text"), data.get("is_sentence"), data.get("shapes")
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        raise DataError(path, record, "missing field 'text' (a non-empty list of strings)")
    if not isinstance(is_sentence, bool):
        raise DataError(path, record, "missing field 'is_sentence' (true or false)")
    if not isinstance(shapes, list):
        raise DataError(path, record, "missing field 'shapes' (a list)")
    polygons = []
    for position, shape in enumerate(shapes):
        label = shape.get("label") if isinstance(shape, dict) else None
        where = f"{record} shape {position}"
        if not isinstance(label, str):
            raise DataError(path, where, "missing field 'label'")
        if label.lower() != FLAG_LABEL:
            polygons.append((label, polygon_points(shape.get("points"), path, where)))
    return Annotation(texts, is_sentence, polygons)


def fill_polygon(mask: np.ndarray, points: np.ndarray, value: int) -> None:
    # LISA draws the outline as well as the interior; the outline adds edge pixels that
    # fillPoly alone leaves out for some slopes, and the ground truth must match pixel for pixel.
    cv2.polylines(mask, [points], True, value, 1)
    cv2.fillPoly(mask, [points], value)


def polygon_area(points: np.ndarray, shape: tuple[int, int]) -> int:
    """The number of pixels `fill_polygon` paints for `points` in an image of `shape` (H, W)."""
    scratch = np.zeros(shape, np.uint8)
    fill_polygon(scratch, points, 1)
    return int(np.count_nonzero(scratch))


def draw_mask(polygons: list[tuple[str, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W] in {0, 1, IGNORE_LABEL}, the largest polygon drawn first."""
    areas = [polygon_area(points, shape) for _, points in polygons] if len(polygons) > 1 else [0]
    mask = np.zeros(shape, np.uint8)
    for index in np.argsort(areas, kind="stable")[::-1]:
        label, points = polygons[index]
        value = IGNORE_LABEL if IGNORE_MARK in label.lower() else TARGET_VALUE
        fill_polygon(mask, points, value)
    return mask


def training_mask(mask: np.ndarray, ignore_pixels: str) -> np.ndarray:
    """uint8 [H, W] mask to train on: "background" keeps only the target (LISA's `mask == 1`),
    "exclude" keeps IGNORE_LABEL for the loss to leave out."""
    if ignore_pixels == "background":
        return (mask == TARGET_VALUE).astype(np.uint8)
    return mask


def load_record(image_path: Path) -> tuple[np.ndarray, Annotation, np.ndarray]:
    """(image uint8 [H, W, 3], annotation, mask uint8 [H, W]) of one ReasonSeg image."""
    json_path = image_path.with_suffix(".json")
    annotation = read_annotation(json_path, image_path.name)
    image = read_image(image_path, json_path, image_path.name)
    return image, annotation, draw_mask(annotation.polygons, image.shape[:2])


def check_records(images: list[Path], deep: bool) -> Iterator[DataError]:
    """One error per bad image/json pair (deep: also decode the image and draw the mask)."""
    for path in images:
        try:
            if deep:
                load_record(path)
            else:
                read_annotation(path.with_suffix(".json"), path.name)
        except DataError as error:
            yield error


class ReasonSegSource:
    """ReasonSeg training images of one or more splits, with optional explanations."""

    def __init__(
        self, dataset_dir: Path, options: SamplingOptions, spec: str = "ReasonSeg|train"
    ) -> None:
        dataset, _ = parse_spec(spec)
        self.name, self.options = f"reason_seg/{spec}", options
        self.images = select_images(Path(dataset_dir), spec)
        self.explanation_file = Path(dataset_dir) / REASON_SEG_DIR / dataset / EXPLANATORY_JSON
        self.explanations: dict[str, tuple[int, dict]] = {}
        self.explanation_errors: list[DataError] = []
        if options.explanatory >= 0:
            self.read_explanations()

    def read_explanations(self) -> None:
        """Index the explanatory json by image name; malformed entries are kept for `check`."""
        file = self.explanation_file
        items = read_json(file, "pass --explanatory -1 to train without explanations")
        if not isinstance(items, list):
            raise DataError(file, None, "expected a json list of {image, query, outputs}")
        for position, item in enumerate(items):
            image = item.get("image") if isinstance(item, dict) else None
            if not isinstance(image, str):
                self.explanation_errors.append(DataError(file, position, "missing field 'image'"))
                continue
            self.explanations[image] = (position, item)

    def explanation(self, image_name: str) -> str | None:
        """The explanation of an image, None if it has none; DataError if its entry is bad."""
        if image_name not in self.explanations:
            return None
        position, item = self.explanations[image_name]
        if not isinstance(item.get("outputs"), str):
            record = f"{position} ({image_name})"
            raise DataError(self.explanation_file, record, "missing field 'outputs'")
        return item["outputs"]

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Image `index` with up to `num_classes_per_sample` of its texts and the explanation
        mode drawn from `rng` (module docstring); masks uint8 [k, H, W]."""
        path = self.images[check_record_index(index, len(self), self.name)]
        image, annotation, drawn = load_record(path)
        mask = training_mask(drawn, self.options.ignore_pixels)
        count = min(self.options.num_classes_per_sample, len(annotation.texts))
        texts = [
            annotation.texts[i] for i in rng.choice(len(annotation.texts), count, replace=False)
        ]
        outputs = self.explanation(path.name)
        mode = explanation_mode(outputs, self.options.explanatory, rng)
        style = reason_seg_style(self.options.prompt_style)
        if mode == PLAIN:
            targets = [
                Target(t if annotation.is_sentence else t.lower(), annotation.is_sentence, mask)
                for t in texts
            ]
            conversations, masks = build_conversations(
                targets, style, rng, mask.shape, self.options.num_classes_per_sample
            )
        else:
            conversations, masks = explanation_conversations(
                texts, mask, outputs, mode, rng, single_target_answers(style)
            )
        return Sample(image, conversations, masks, str(path), self.name)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.explanation_errors
        for image_name in self.explanations:
            try:
                self.explanation(image_name)
            except DataError as error:
                yield error
        yield from check_records(self.images, deep)


def reason_seg_style(prompt_style: str) -> str:
    """The style of ReasonSeg's conversations: "cores" for CoReS, LISA's for every other
    `--prompt_style` (module docstring)."""
    return CORES_STYLE if prompt_style == CORES_STYLE else LISA_STYLE


def explanation_mode(explanation: str | None, probability: float, rng: np.random.Generator) -> str:
    """PLAIN without an explanation; else EXPLANATION_ONLY with `probability`, else 50/50
    PLAIN or EXPLAINED (LISA's choices 2, 0 and 1)."""
    if explanation is None:
        return PLAIN
    if rng.random() < probability:
        return EXPLANATION_ONLY
    return PLAIN if rng.random() < 0.5 else EXPLAINED


def explanation_conversations(
    texts: list[str],
    mask: np.ndarray,
    outputs: str,
    mode: str,
    rng: np.random.Generator,
    answers: tuple[str, ...],
) -> tuple[list[list[tuple[str, str]]], np.ndarray]:
    """One conversation per text answered with the explanation `outputs`: alone and without
    masks (EXPLANATION_ONLY), or after a `[SEG]` answer drawn from `answers` with `mask` [H, W]
    each (EXPLAINED)."""
    if mode == EXPLANATION_ONLY:
        return [[(IMAGE_PREFIX + text, outputs)] for text in texts], stack_masks([], mask.shape)
    conversations = [
        [
            (
                f"{IMAGE_PREFIX}{text} {choose(rng, EXPLANATORY_QUESTIONS)}",
                f"{choose(rng, answers)} {outputs}",
            )
        ]
        for text in texts
    ]
    return conversations, stack_masks([mask] * len(texts), mask.shape)


class ReasonSegValidation:
    """ReasonSeg validation/test images (`--val_dataset "ReasonSeg|val"` gives split "val"; "a_b"
    joins splits; "test_short"/"test_long" (or "testshort"/"testlong") keep one query type):
    one question about `text[0]` per image, answered `answer` (`--val_answer`, one `[SEG]`)."""

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "val",
        dataset: str = "ReasonSeg",
        answer: str = DEFAULT_VAL_ANSWER,
    ) -> None:
        self.name = f"{dataset}|{split}"
        self.answer = check_val_answer(answer)
        self.images = select_images(Path(dataset_dir), self.name)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ValidationSample:
        """Masks uint8 [1, H, W]; ignore pixels stay IGNORE_LABEL (the metrics skip them)."""
        path = self.images[index]
        image, annotation, mask = load_record(path)
        text = annotation.texts[0].strip()
        return ValidationSample(
            image=image,
            conversations=[[(validation_question(text, annotation.is_sentence), self.answer)]],
            masks=mask[None],
            image_path=str(path),
            source=f"reason_seg/{self.name}",
            target_names=[text],
            record_id=path.name,
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from check_records(self.images, deep)


def build_reason_seg_sources(
    dataset_dir: str | Path, names: list[str], options: SamplingOptions
) -> list[Source]:
    """One source per `--reason_seg_data` entry ("ReasonSeg|train", "ReasonSeg|train_val")."""
    return [ReasonSegSource(Path(dataset_dir), options, name) for name in names]
