"""What `make demo` reports: the referring baselines it measures learning against, the model's
scores on the same targets, the criterion, `summary.json`, the printed tables, the
training-curve PNG and the chat strip (drawn with OpenCV; no plotting library is needed).

Baselines, on the present targets of the referring validation set (gRefCOCO val: several shapes
per image, distractors sharing colour or shape, some expressions naming absent shapes):
- "untrained": the model before training (from its evaluation records);
- "all_shapes": the union of every shape in the image, whatever the question;
- "random_shape": one shape of the image picked uniformly at random (its expected gIoU);
- "always_seg": answering `[SEG]` for every target (its `[SEG]`/`[REJ]` accuracy).
The trained model must beat the first three in gIoU on present targets, and "always_seg" in
accuracy, by `MARGIN` each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

MARGIN = 0.1
PRESENT_GIOU, ACCURACY = "present_giou", "decision_accuracy"
GIOU_BASELINES = ("untrained", "all_shapes", "random_shape")
ACCURACY_BASELINE = "always_seg"
TABLE_METRICS = {"giou": "gIoU", "ciou": "cIoU", "n_acc": "N-acc", "t_acc": "T-acc"}
REFERRING_METRICS = {PRESENT_GIOU: "gIoU(present)", ACCURACY: "SEG/REJ acc"}
PERCENT = 100.0

# training-curve drawing
PANEL_SIZE = (480, 320)  # (width, height) of one panel
PANEL_MARGIN = (60, 40, 20, 40)  # left, top, right, bottom
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
LOSS_COLOUR, VAL_COLOUR = (200, 80, 30), (30, 140, 40)  # BGR
FONT, FONT_SCALE, TITLE_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0.5
LINE_WIDTH, POINT_RADIUS = 2, 3
GRID_LINES = 4
UNIT_RANGE = (0.0, 1.0)  # the vertical axis of gIoU
# chat strip: each picture enlarged to STRIP_HEIGHT (nearest pixels), STRIP_GAP white columns
# between them, a caption band of CAPTION_LINE pixels per line below
STRIP_HEIGHT, STRIP_GAP, CAPTION_LINE, CAPTION_BASELINE = 128, 4, 16, 5

ImageTargets = tuple[Sequence[np.ndarray | None], Sequence[np.ndarray]]


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two bool/0-1 masks [H, W] (1.0 when both are empty)."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    union = np.logical_or(prediction, target).sum()
    return float(np.logical_and(prediction, target).sum() / union) if union else 1.0


def referring_baselines(images: Iterable[ImageTargets]) -> dict[str, float]:
    """The model-free baselines over every image's targets.

    images: per image, (target masks [H, W], None for an absent target; the mask of every shape
    in the image). Returns {"all_shapes", "random_shape"} (mean IoU over present targets) and
    {"always_seg"} (the fraction of targets that are present).
    """
    all_shapes, random_shape, present, total = [], [], 0, 0
    for targets, shapes in images:
        everything = np.logical_or.reduce([np.asarray(s, bool) for s in shapes])
        for target in targets:
            total += 1
            if target is None or not np.asarray(target).any():
                continue
            present += 1
            all_shapes.append(iou(everything, target))
            random_shape.append(float(np.mean([iou(shape, target) for shape in shapes])))
    if not present:
        raise ValueError("the referring validation set has no present target to score")
    return {
        "all_shapes": float(np.mean(all_shapes)),
        "random_shape": float(np.mean(random_shape)),
        ACCURACY_BASELINE: present / total,
    }


def grefcoco_images(dataset_dir: str | Path, split: str = "val") -> Iterator[ImageTargets]:
    """(targets, shapes) of every image of gRefCOCO's `split`, one target per sentence, in
    the order of the validation set; shapes: the image's single objects in instances.json
    (crowd annotations, which cover several objects of a class, are not shapes)."""
    # imported here: the report and its tests need no data pipeline otherwise
    from utils.datasets.coco import decode_segmentation
    from utils.datasets.refer import open_refer_index

    index = open_refer_index(dataset_dir, "grefcoco", "unc")
    shapes_of: dict[int, list[dict]] = {}
    for annotation in index.annotations.values():
        if not annotation.get("iscrowd", 0):
            shapes_of.setdefault(annotation["image_id"], []).append(annotation)
    for image_id, refs in index.refs_by_image(split).items():
        size = index.image_shape(image_id, image_id)
        shapes = [
            decode_segmentation(a["segmentation"], size, index.instances_file, a["id"])
            for a in shapes_of[image_id]
        ]
        targets = [index.ref_mask(ref) for ref in refs for _ in ref.sentences]
        yield targets, shapes


def read_records(path: str | Path) -> list[dict]:
    """The per-target records of an `eval_<set>.jsonl` file."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def record_scores(records: Iterable[dict]) -> dict[str, float]:
    """gIoU over present targets (IoU of the decoded mask) and the `[SEG]`/`[REJ]` decision
    accuracy over all targets, from evaluation records (`utils.metrics.RECORD_KEYS`)."""
    ious, correct, total = [], 0, 0
    for record in records:
        total += 1
        present = not record["empty_gt"]
        correct += int(bool(record["predicted_present"]) == present)
        if present:
            union = record["union"]
            ious.append(record["intersection"] / union if union else 1.0)
    if not ious:
        raise ValueError("no present target among the records")
    return {PRESENT_GIOU: float(np.mean(ious)), ACCURACY: correct / total}


def criterion(
    trained: dict[str, float], baselines: dict[str, float], margin: float = MARGIN
) -> dict[str, object]:
    """The margins of the trained model over each baseline, and whether all reach `margin`."""
    margins = {name: trained[PRESENT_GIOU] - baselines[name] for name in GIOU_BASELINES}
    margins[ACCURACY_BASELINE] = trained[ACCURACY] - baselines[ACCURACY_BASELINE]
    return {
        "margin_required": margin,
        "margins": margins,
        "met": all(value >= margin for value in margins.values()),
    }


def set_metrics(summary: dict[str, float | None], extra: dict[str, float] | None = None) -> dict:
    """One set's table metrics (gIoU, cIoU, N-acc, T-acc where defined) plus `extra`."""
    metrics = {key: summary[key] for key in TABLE_METRICS if summary.get(key) is not None}
    return {**metrics, **(extra or {})}


def build_summary(
    untrained: dict[str, dict],
    trained: dict[str, dict],
    baselines: dict[str, dict[str, float]],
    referring_set: str,
    extra: dict | None = None,
) -> dict:
    """summary.json: {"untrained": {set: {metric: value}}, "trained": ..., "baselines": {set:
    {baseline: value}}, "criterion": ...} plus `extra` (runtime, steps, ...)."""
    result = {"untrained": untrained, "trained": trained, "baselines": baselines}
    result["criterion"] = criterion(trained[referring_set], baselines[referring_set])
    return {**result, **(extra or {})}


def _cell(value: float | None) -> str:
    return "" if value is None else f"{PERCENT * value:.2f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_results(summary: dict) -> str:
    """The untrained and trained models side by side, one row per (set, model), percentages."""
    columns = {**TABLE_METRICS, **REFERRING_METRICS}
    rows = [["dataset", "model", *columns.values()]]
    for name in summary["trained"]:
        for model in ("untrained", "trained"):
            metrics = summary[model].get(name, {})
            rows.append([name, model, *(_cell(metrics.get(key)) for key in columns)])
    return _table(rows)


def format_baselines(summary: dict, referring_set: str) -> str:
    """Each baseline's score, the trained model's and its margin (percentage points)."""
    trained, baselines = summary["trained"][referring_set], summary["baselines"][referring_set]
    margins = summary["criterion"]["margins"]
    rows = [["measure", "baseline", "baseline value", "trained", "margin"]]
    for name in (*GIOU_BASELINES, ACCURACY_BASELINE):
        metric = ACCURACY if name == ACCURACY_BASELINE else PRESENT_GIOU
        rows.append(
            [
                REFERRING_METRICS[metric],
                name,
                _cell(baselines[name]),
                _cell(trained[metric]),
                f"{PERCENT * margins[name]:+.2f}",
            ]
        )
    verdict = "met" if summary["criterion"]["met"] else "NOT met"
    required = PERCENT * summary["criterion"]["margin_required"]
    return _table(rows) + f"\ncriterion (every margin >= {required:.0f} points): {verdict}"


def _scale(
    values: Sequence[float], low: float, high: float, span: tuple[float, float] | None = None
) -> np.ndarray:
    """Map values in `span` (default [min, max]) to [low, high] (the middle when it is empty)."""
    values = np.asarray(values, dtype=np.float64)
    bottom, top = span or (values.min(), values.max())
    if top == bottom:
        return np.full(values.shape, (low + high) / 2)
    return low + (values - bottom) / (top - bottom) * (high - low)


def draw_panel(
    points: Sequence[tuple[int, float]],
    title: str,
    colour: tuple[int, int, int],
    y_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """uint8 [h, w, 3] BGR: one curve (step, value) with its axes, range labels and title;
    `y_range` fixes the vertical axis (default: the values' own range)."""
    width, height = PANEL_SIZE
    left, top, right, bottom = PANEL_MARGIN
    panel = np.full((height, width, 3), WHITE, np.uint8)
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    for k in range(GRID_LINES + 1):
        y = int(y0 + k * (y1 - y0) / GRID_LINES)
        cv2.line(panel, (x0, y), (x1, y), GREY, 1)
    cv2.rectangle(panel, (x0, y0), (x1, y1), BLACK, 1)
    cv2.putText(panel, title, (x0, top - 15), FONT, TITLE_SCALE, BLACK, 1, cv2.LINE_AA)
    if not points:
        return panel
    steps, values = zip(*points, strict=True)
    xs = _scale(steps, x0, x1) if len(points) > 1 else np.array([(x0 + x1) / 2])
    ys = _scale(values, y1, y0, y_range)
    curve = np.stack([xs, ys], axis=1).round().astype(np.int32)
    cv2.polylines(panel, [curve], False, colour, LINE_WIDTH, cv2.LINE_AA)
    for x, y in curve:
        if len(points) <= GRID_LINES * 4:
            cv2.circle(panel, (int(x), int(y)), POINT_RADIUS, colour, -1, cv2.LINE_AA)
    bottom, top = y_range or (min(values), max(values))
    labels = (
        (f"{top:.2f}", (2, y0 + 5)),
        (f"{bottom:.2f}", (2, y1)),
        (f"step {min(steps)}", (x0, y1 + 15)),
        (f"step {max(steps)}", (x1 - 70, y1 + 15)),
    )
    for text, origin in labels:
        cv2.putText(panel, text, origin, FONT, FONT_SCALE, BLACK, 1, cv2.LINE_AA)
    return panel


def write_curve(
    path: str | Path,
    loss: Sequence[tuple[int, float]],
    validation: Sequence[tuple[int, float]],
    validation_title: str = "val gIoU",
) -> Path:
    """A PNG with two panels, training loss and validation gIoU against the optimizer step."""
    image = np.concatenate(
        [
            draw_panel(loss, "train loss", LOSS_COLOUR),
            draw_panel(validation, validation_title, VAL_COLOUR, UNIT_RANGE),
        ],
        axis=1,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
    return path


def validation_curve(metrics_file: str | Path, set_name: str, metric: str) -> list[tuple]:
    """(global step, value) of one set's metric from a run's metrics.jsonl."""
    points = []
    for record in read_records(metrics_file):
        value = record["results"].get(set_name, {}).get(metric)
        if value is not None:
            points.append((int(record["global_step"]), float(value)))
    return points


def loss_curve(run_dir: str | Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """(global step, value) of a TensorBoard scalar of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def write_chat_strip(
    path: str | Path, pictures: Sequence[np.ndarray], captions: Sequence[str]
) -> Path:
    """One PNG of the chat's pictures (BGR uint8 [H, W, 3] each) side by side, enlarged to
    STRIP_HEIGHT, with the caption lines underneath."""
    tiles = []
    for picture in pictures:
        width = round(picture.shape[1] * STRIP_HEIGHT / picture.shape[0])
        tiles.append(cv2.resize(picture, (width, STRIP_HEIGHT), interpolation=cv2.INTER_NEAREST))
        tiles.append(np.full((STRIP_HEIGHT, STRIP_GAP, 3), WHITE, np.uint8))
    row = np.concatenate(tiles[:-1], axis=1)
    band = np.full((CAPTION_LINE * len(captions), row.shape[1], 3), WHITE, np.uint8)
    for index, caption in enumerate(captions):
        origin = (2, CAPTION_LINE * (index + 1) - CAPTION_BASELINE)
        cv2.putText(band, caption, origin, FONT, FONT_SCALE, BLACK, 1, cv2.LINE_AA)
    path = Path(path)
    if not cv2.imwrite(str(path), np.concatenate([row, band], axis=0)):
        raise OSError(f"could not write {path}")
    return path
