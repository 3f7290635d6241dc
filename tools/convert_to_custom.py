"""Write data in the custom format (docs/CUSTOM_DATA.md, `utils/datasets/custom.py`):

    python tools/convert_to_custom.py coco --instances FILE --questions TABLE --out OUT
    python tools/convert_to_custom.py set --dataset_dir DIR --set ENTRY --out OUT
        [--val_json_name NAME] [--image_root DIR]

`coco`: a COCO instances file plus a question table (CSV with a header row, or a JSON list of
objects). A row with `category` asks about that category in every image that has it: its
`question` and `answer` may say `{category}`, the answer holds one `{seg}` (the union of the
category's instances in the image, named by the category); with `absent_answer` (one `{rej}`)
it is also asked of the images without the category. A row with `image_id` asks about that
image: its answer's `{seg}`/`{rej}` are, in order, the categories of `targets` (";"-joined; a
`{seg}` category must be in the image, a `{rej}` one must not). `file_name`s stay COCO's (give
the image folder as the image root when training).

`set`: a set of the existing families as its evaluation reads it, written record by record:
ENTRY is a `--val_dataset` entry whose split may be any the files hold ("refcoco|unc|train",
"grefcoco|unc|val", "ReasonSeg|train", "MultiPartReasonSeg|val" with `--val_json_name
MMR_train.json`, ...). Each sample becomes a record with one object-form conversation per
question (the text as the evaluation writes it, the image placeholder left out), masks as
compressed RLE (ignore pixels as "ignore"), targets named as the evaluation names them;
`file_name`s are relative to `--image_root` (default: `--dataset_dir`). Reading the output back
(`--val_dataset "custom|OUT@ROOT"`) gives the same samples.

OUT ending in .jsonl is written one record per line, else as a JSON list.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.datasets.base import IGNORE_LABEL, DataError, ValidationSample  # noqa: E402
from utils.datasets.coco import decode_segmentation  # noqa: E402
from utils.datasets.custom import (  # noqa: E402
    JSONL_SUFFIX,
    PLACEHOLDERS,
    REJ_PLACEHOLDER,
    SEG_PLACEHOLDER,
)
from utils.datasets.templates import IMAGE_PREFIX, REJ, SEG  # noqa: E402
from utils.datasets.validation import FIELD_SEPARATOR, ValEntry, build_validation_set  # noqa: E402

TOKEN_PATTERN = re.compile(re.escape(SEG) + "|" + re.escape(REJ))
PLACEHOLDER_OF = {SEG: SEG_PLACEHOLDER, REJ: REJ_PLACEHOLDER}
TARGET_SEPARATOR = ";"
CATEGORY_FIELD = "{category}"
CSV_SUFFIX = ".csv"
FAILED = 1
ROW_KEYS = ("question", "answer")
ROW_KINDS = ("category", "image_id")


# --- from a validation set of the existing families -------------------------------------------
def rle(mask: np.ndarray) -> dict:
    """A binary [H, W] mask as a compressed COCO RLE with str counts (JSON-ready)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(n) for n in encoded["size"]], "counts": encoded["counts"].decode()}


def target_entry(token: str, phrase: str, mask: np.ndarray) -> dict:
    """The format's target of one `[SEG]`/`[REJ]` with its mask row (uint8 in {0, 1, 255})."""
    if token == REJ:
        return {"phrase": phrase}
    entry = {"phrase": phrase, "segmentation": rle(mask == 1)}
    if (mask == IGNORE_LABEL).any():
        entry["ignore"] = rle(mask == IGNORE_LABEL)
    return entry


def sample_record(sample: ValidationSample, image_root: Path) -> dict:
    """A validation sample as one record of the format (object-form conversations)."""
    path = Path(sample.image_path).absolute()
    if not path.is_relative_to(image_root.absolute()):
        raise ValueError(f"image {path} is not under --image_root {image_root}")
    conversations, row = [], 0
    for turns in sample.conversations:
        written, masks = [], []
        for question, answer in turns:
            for token in TOKEN_PATTERN.findall(answer):
                masks.append(target_entry(token, sample.target_names[row], sample.masks[row]))
                row += 1
            text = TOKEN_PATTERN.sub(lambda match: PLACEHOLDER_OF[match.group()], answer)
            written.append({"question": question.removeprefix(IMAGE_PREFIX), "answer": text})
        conversations.append({"turns": written, "masks": masks})
    height, width = sample.image.shape[:2]
    return {
        "file_name": path.relative_to(image_root.absolute()).as_posix(),
        "height": height,
        "width": width,
        "id": sample.record_id,
        "conversations": conversations,
    }


def parse_set(text: str) -> ValEntry:
    """A validation entry with any split ("refcoco|unc|train", "ReasonSeg|train")."""
    fields = text.split(FIELD_SEPARATOR)
    if len(fields) == 2:
        return ValEntry(fields[0], "", fields[1])
    if len(fields) == 3:
        return ValEntry(*fields)
    raise ValueError(f"--set {text!r}: expected DATASET|SPLIT or DATASET|SPLITBY|SPLIT")


def set_records(dataset_dir: Path, entry: ValEntry, json_name: str, image_root: Path):
    """Every sample of the set as a record, in order."""
    validation = build_validation_set(dataset_dir, entry, json_name)
    for index in tqdm(range(len(validation)), desc=f"convert {entry}", disable=None):
        yield sample_record(validation[index], image_root)


# --- from COCO instances and a question table -------------------------------------------------
def read_table(path: Path) -> list[dict]:
    """The question table's rows (CSV with a header, or a JSON list of objects)."""
    if path.suffix == CSV_SUFFIX:
        with path.open(newline="", encoding="utf-8") as handle:
            return [{k: v for k, v in row.items() if v} for row in csv.DictReader(handle)]
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(path, None, "expected a JSON list of objects (one per question)")
    return rows


def check_row(table: Path, position: int, row: dict) -> None:
    """DataError naming the table and the row unless it has a question, an answer and exactly
    one of `category` / `image_id`."""
    missing = [key for key in ROW_KEYS if not row.get(key)]
    kinds = [key for key in ROW_KINDS if key in row]
    if missing or len(kinds) != 1:
        raise DataError(
            table,
            f"row {position}",
            f"needs {' and '.join(ROW_KEYS)} (missing {missing}) and exactly one of "
            f"{' / '.join(ROW_KINDS)} (has {kinds})",
        )


class CocoIndex:
    """A COCO instances file: images, category names and, per image, each category's union mask."""

    def __init__(self, path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        self.path = path
        self.images = {image["id"]: image for image in data["images"]}
        self.names = {category["id"]: category["name"] for category in data["categories"]}
        self.annotations: dict[object, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for annotation in data["annotations"]:
            name = self.names[annotation["category_id"]]
            self.annotations[annotation["image_id"]][name].append(annotation)

    def union(self, image_id: object, name: str) -> np.ndarray:
        """uint8 [H, W]: every instance of category `name` in the image."""
        image = self.images[image_id]
        shape = (image["height"], image["width"])
        masks = [
            decode_segmentation(a["segmentation"], shape, self.path, f"annotation {a['id']}")
            for a in self.annotations[image_id][name]
        ]
        return np.maximum.reduce(masks).astype(np.uint8)


def _target(coco: CocoIndex, image_id: object, placeholder: str, name: str, where: str) -> dict:
    present = name in coco.annotations[image_id]
    if (placeholder == SEG_PLACEHOLDER) != present:
        state = "is not" if placeholder == SEG_PLACEHOLDER else "is"
        raise ValueError(f"{where}: category {name!r} {state} in image {image_id} ({placeholder})")
    if not present:
        return {"phrase": name}
    return {"phrase": name, "segmentation": rle(coco.union(image_id, name))}


def _conversation(question: str, answer: str, targets: list[dict]) -> dict:
    return {"turns": [{"question": question, "answer": answer}], "masks": targets}


def category_conversations(coco: CocoIndex, row: dict, image_id: object) -> Iterator[dict]:
    """The row's conversation for this image (none when it lacks the category and the row has
    no `absent_answer`)."""
    name = row["category"]
    present = name in coco.annotations[image_id]
    answer = row["answer"] if present else row.get("absent_answer")
    if answer is None:
        return
    question, answer = (text.replace(CATEGORY_FIELD, name) for text in (row["question"], answer))
    placeholders = PLACEHOLDERS.findall(answer)
    expected = [SEG_PLACEHOLDER if present else REJ_PLACEHOLDER]
    if placeholders != expected:
        raise ValueError(f"question row {row}: the answer must hold exactly {expected[0]}")
    yield _conversation(question, answer, [_target(coco, image_id, expected[0], name, "row")])


def image_conversation(coco: CocoIndex, row: dict) -> dict:
    names = [n.strip() for n in str(row.get("targets", "")).split(TARGET_SEPARATOR) if n.strip()]
    placeholders = PLACEHOLDERS.findall(row["answer"])
    if len(names) != len(placeholders):
        raise ValueError(
            f"question row {row}: {len(placeholders)} placeholders but {len(names)} targets"
        )
    image_id = _image_key(coco, row["image_id"])
    targets = [
        _target(coco, image_id, p, n, f"row of image {image_id}")
        for p, n in zip(placeholders, names, strict=True)
    ]
    return _conversation(row["question"], row["answer"], targets)


def _image_key(coco: CocoIndex, value: object) -> object:
    """A table's image id (CSV gives text) as the instances file's id."""
    for key in (value, str(value)):
        if key in coco.images:
            return key
    if str(value).isdigit() and int(value) in coco.images:
        return int(value)
    raise ValueError(f"image_id {value!r} is not in {coco.path}")


def coco_records(instances: Path, table: Path) -> Iterator[dict]:
    """One record per image that gets at least one conversation, in the instances' order."""
    coco, rows = CocoIndex(instances), read_table(table)
    for position, row in enumerate(rows):
        check_row(table, position, row)
    per_image: dict[object, list[dict]] = defaultdict(list)
    for row in rows:
        if "image_id" in row:
            per_image[_image_key(coco, row["image_id"])].append(image_conversation(coco, row))
    for image_id, image in coco.images.items():
        conversations = [
            conversation
            for row in rows
            if "category" in row
            for conversation in category_conversations(coco, row, image_id)
        ] + per_image[image_id]
        if conversations:
            yield {
                "file_name": image["file_name"],
                "height": image["height"],
                "width": image["width"],
                "id": image_id,
                "conversations": conversations,
            }


# --- writing and the command line --------------------------------------------------------------
def write_records(records: Iterator[dict], out: Path) -> int:
    """Write the records (JSONL for a .jsonl `out`, else a JSON list); returns their number."""
    records = list(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == JSONL_SUFFIX:
        out.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    else:
        out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return len(records)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_to_custom.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", help="COCO instances + a question table")
    coco.add_argument("--instances", type=Path, required=True)
    coco.add_argument("--questions", type=Path, required=True, help="CSV or JSON table")
    coco.add_argument("--out", type=Path, required=True)
    from_set = commands.add_parser("set", help="a set of the existing families")
    from_set.add_argument("--dataset_dir", type=Path, default=Path("./dataset"))
    from_set.add_argument("--set", dest="entry", type=parse_set, required=True)
    from_set.add_argument("--val_json_name", default="", help="MMR / RefCOCOm file")
    from_set.add_argument("--image_root", type=Path, help="default: --dataset_dir")
    from_set.add_argument("--out", type=Path, required=True)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "coco":
            records = coco_records(args.instances, args.questions)
        else:
            root = args.image_root or args.dataset_dir
            records = set_records(args.dataset_dir, args.entry, args.val_json_name, root)
        count = write_records(records, args.out)
    except (DataError, ValueError, OSError) as error:
        print(f"convert_to_custom.py: error: {error}", file=sys.stderr)
        return FAILED
    print(f"wrote {count} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
