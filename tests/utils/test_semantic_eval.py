"""Semantic-segmentation scoring (utils/semantic_eval.py): name matching, label composition on
hand-built masks, mIoU against hand-computed confusion matrices under both protocols (ours and
LaSagnA's, checked against a transcription of LaSagnA's code), and two ranks equal one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.metrics import shard_indices
from utils.semantic_eval import (
    ComposedIoUAccumulator,
    SemanticScorer,
    compose_labels,
    format_class_table,
    lasagna_compat_gt,
    lasagna_compat_labels,
    lasagna_match,
    match_names,
)

CLASSES = ["wall", "traffic light", "sky", "person"]
WORLD_SIZE = 2


def test_exact_then_fuzzy_then_unmatched() -> None:
    names = ["Wall", "traffic  light", "trafic light", "skyy", "banana", ""]
    match = match_names(names, CLASSES)
    assert match.class_ids == [0, 1, 1, 2, None, None]
    assert match.fuzzy == 2 and match.unmatched == 2


def test_lasagna_matching_removes_spaces_and_always_matches() -> None:
    match = lasagna_match(["traffic light", "banana", "sky"], CLASSES)
    assert match.class_ids[0] == 1 and match.class_ids[2] == 2
    assert match.class_ids[1] is not None and match.unmatched == 0
    assert match.fuzzy == 2  # "trafficlight" and "banana" are not class names as written


def test_composition_highest_logit_wins_and_uncovered_is_no_class() -> None:
    # 2 x 3 image, K = 4 (NO_CLASS = 4); the third mask's name is unmatched: left out
    logits = torch.tensor(
        [
            [[2.0, 1.0, -1.0], [-1.0, -1.0, -1.0]],  # class 2
            [[3.0, -1.0, -1.0], [1.0, -1.0, -1.0]],  # class 0
            [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]],  # unmatched
            [[0.5, 1.0, -1.0], [-1.0, -1.0, -2.0]],  # class 1: ties mask 0 at (0, 1)
        ]
    )
    labels = compose_labels(logits, [2, 0, None, 1], num_classes=4)
    assert labels.tolist() == [[0, 2, 4], [0, 4, 4]]
    no_masks = compose_labels(torch.zeros(0, 2, 3), [], num_classes=4)
    assert no_masks.tolist() == [[4, 4, 4], [4, 4, 4]]


def lasagna_semantic_inference(logits: torch.Tensor, class_ids: list[int], k: int) -> torch.Tensor:
    """LaSagnA test_sem.py semantic_inference + IoU.add's argmax, transcribed (the oracle)."""
    mask_pred = logits.clone()
    mask_pred[mask_pred <= 0] = 0
    result = torch.zeros((k, mask_pred.size(1), mask_pred.size(2)))
    for idx, cur_label in enumerate(class_ids):
        result[cur_label] = mask_pred[idx]
    return result.unsqueeze(0).max(1)[1][0]


def test_compat_composition_by_hand_and_against_lasagnas_code() -> None:
    # 1 x 3, K = 4: mask 2 overwrites mask 0 (same class 2); at pixel 1 channels 1 and 2 tie
    logits = torch.tensor([[[5.0, 1.0, -1.0]], [[3.0, 1.0, -5.0]], [[0.5, 1.0, -1.0]]])
    class_ids = [2, 1, 2]
    labels = lasagna_compat_labels(logits, class_ids, num_classes=4)
    assert labels.tolist() == [[1, 1, 0]]
    assert torch.equal(labels, lasagna_semantic_inference(logits, class_ids, 4))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        count = int(torch.randint(0, 6, (1,), generator=generator))
        logits = torch.randn(count, 5, 7, generator=generator).round()  # ties happen
        class_ids = torch.randint(0, 6, (count,), generator=generator).tolist()
        expected = lasagna_semantic_inference(logits, class_ids, 6)
        assert torch.equal(lasagna_compat_labels(logits, class_ids, 6), expected)


def test_compat_gt_is_the_argmax_of_binary_channels() -> None:
    gt = torch.tensor([[0, 2, 255], [1, 255, 2]])
    channels = torch.stack([gt == c for c in range(3)]).float().unsqueeze(0)
    assert torch.equal(lasagna_compat_gt(gt), channels.max(1)[1][0])


def test_confusion_with_no_class_by_hand() -> None:
    acc = ComposedIoUAccumulator(3)
    gt = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 3, 1], [0, 1, 2]])  # 3 = NO_CLASS; the 255 pixel is not scored
    acc.update(pred, gt)
    # rows GT 0..2, columns prediction 0..3 (NO_CLASS)
    expected = [[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert acc.state().tolist() == expected
    iou = acc.class_iou().tolist()
    assert iou == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert acc.summary()["miou"] == pytest.approx(11 / 18)
    with pytest.raises(ValueError, match="GT classes must be in"):
        acc.update(pred, torch.full_like(gt, 3))


def image_case() -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """classes wall, sky, road; GT [[wall, wall, sky], [sky, 255, road]]; masks for sky, road."""
    gt = torch.tensor([[0, 0, 1], [1, 255, 2]])
    logits = torch.tensor(
        [[[-1.0, 2.0, 3.0], [1.0, 4.0, -1.0]], [[-1.0, -1.0, -1.0], [-1.0, -1.0, 5.0]]]
    )
    return logits, ["sky", "road"], gt


def test_standard_scoring_by_hand() -> None:
    scorer = SemanticScorer(["wall", "sky", "road"])
    scorer.update(*image_case(), record_id="a")
    scorer.reduce()
    summary = scorer.summary()
    # prediction [[none, sky, sky], [sky, sky, road]]; the 255 pixel is left out
    # confusion rows wall [0 1 0 1], sky [0 2 0 0], road [0 0 1 0]
    assert summary["per_class_iou"] == pytest.approx({"wall": 0.0, "sky": 2 / 3, "road": 1.0})
    assert summary["miou"] == pytest.approx(5 / 9)
    assert summary["pixel_accuracy"] == pytest.approx(3 / 5)
    assert (summary["generated_names"], summary["unmatched_names"]) == (2, 0)
    assert summary["protocol"] == "standard"
    # per class [intersection, union] of this image: wall [0, 2 + 0], sky [2, 2 + 3 - 2],
    # road [1, 1 + 1 - 1]
    assert scorer.records == [
        {
            "record_id": "a",
            "names": ["sky", "road"],
            "matched": ["sky", "road"],
            "unmatched": 0,
            "classes": {"wall": [0, 2], "sky": [2, 3], "road": [1, 1]},
        }
    ]


def test_compat_scoring_by_hand() -> None:
    scorer = SemanticScorer(["wall", "sky", "road"], lasagna_miou_compat=True)
    scorer.update(*image_case())
    scorer.reduce()
    summary = scorer.summary()
    # prediction [[wall(0), sky, sky], [sky, sky, road]]; GT 255 -> wall (0)
    # confusion rows wall [1 2 0], sky [0 2 0], road [0 0 1]
    assert summary["per_class_iou"] == pytest.approx({"wall": 1 / 3, "sky": 1 / 2, "road": 1.0})
    assert summary["miou"] == pytest.approx(11 / 18)
    assert summary["pixel_accuracy"] == pytest.approx(4 / 6)
    assert summary["protocol"] == "lasagna_compat"
    # per class [intersection, union]: wall [1, 3 + 1 - 1], sky [2, 2 + 4 - 2], road [1, 1]
    assert scorer.records[0]["classes"] == {"wall": [1, 3], "sky": [2, 4], "road": [1, 1]}


def lasagna_iou(images: list[tuple[torch.Tensor, list[int], torch.Tensor]], k: int) -> tuple:
    """LaSagnA's validate loop (GT channels, semantic_inference, utils/miou ConfusionMatrix +
    IoU.value with ignore_index None), transcribed for one process: (per-class IoU, mIoU)."""
    conf = np.zeros((k, k), dtype=np.int64)
    for logits, class_ids, gt in images:
        gt_masks = torch.zeros((k, *gt.shape), dtype=torch.bool)
        for c in range(k):
            gt_masks[c] |= gt == c
        target = gt_masks.float().unsqueeze(0).max(1)[1].view(-1).numpy()
        predicted = lasagna_semantic_inference(logits, class_ids, k).view(-1).numpy()
        conf += np.bincount(predicted + k * target, minlength=k**2).reshape(k, k)
    true_positive = np.diag(conf)
    false_positive = conf.sum(0) - true_positive
    false_negative = conf.sum(1) - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_positive / (true_positive + false_positive + false_negative)
    return iou, np.nanmean(iou)


def test_compat_scoring_equals_lasagnas_code_on_random_images() -> None:
    classes = ["wall", "sky", "road", "car", "tree"]
    generator = torch.Generator().manual_seed(3)
    images = []
    for _ in range(6):
        count = int(torch.randint(0, 5, (1,), generator=generator))
        class_ids = torch.randint(0, 4, (count,), generator=generator).tolist()  # tree never
        gt = torch.randint(0, 4, (6, 7), generator=generator)
        gt[torch.rand(6, 7, generator=generator) < 0.2] = 255
        images.append((torch.randn(count, 6, 7, generator=generator), class_ids, gt))
    scorer = SemanticScorer(classes, lasagna_miou_compat=True)
    for logits, class_ids, gt in images:
        scorer.update(logits, [classes[i] for i in class_ids], gt)
    scorer.reduce()
    summary = scorer.summary()
    iou, miou = lasagna_iou(images, len(classes))
    got = np.array([np.nan if v is None else v for v in summary["per_class_iou"].values()])
    np.testing.assert_allclose(got, iou, rtol=1e-12)
    assert np.isnan(iou[4]) and summary["miou"] == pytest.approx(miou, rel=1e-12)


def test_unmatched_names_are_counted_and_their_masks_left_out() -> None:
    logits, _, gt = image_case()
    scorer = SemanticScorer(["wall", "sky", "road"])
    scorer.update(logits, ["sky", "banana"], gt)
    scorer.reduce()
    summary = scorer.summary()
    assert (summary["generated_names"], summary["unmatched_names"]) == (2, 1)
    # road's pixel is now uncovered: road IoU 0, the class is in the GT
    assert summary["per_class_iou"]["road"] == 0.0
    assert scorer.records[0]["matched"] == ["sky", None]


def test_classes_in_neither_gt_nor_prediction_are_left_out_of_the_mean() -> None:
    logits, names, gt = image_case()
    scorer = SemanticScorer(["wall", "sky", "road", "car"])
    scorer.update(logits, names, gt)
    scorer.reduce()
    summary = scorer.summary()
    assert summary["per_class_iou"]["car"] is None
    assert summary["miou"] == pytest.approx(5 / 9)
    table = format_class_table(summary).splitlines()
    assert table[0] == "class  IoU" and table[2] == "sky    66.67"
    assert table[4] == "car" and table[5] == "mIoU   55.56"


def test_masks_and_names_must_agree() -> None:
    logits, _, gt = image_case()
    with pytest.raises(ValueError, match="1 matched names for mask logits of shape"):
        SemanticScorer(["wall", "sky", "road"]).update(logits, ["sky"], gt)


def dataset_images() -> list[tuple[torch.Tensor, list[str], torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    names = ["wall", "sky", "road", "banana"]
    images = []
    for _ in range(5):
        count = int(torch.randint(0, 4, (1,), generator=generator))
        chosen = [names[int(i)] for i in torch.randint(0, 4, (count,), generator=generator)]
        gt = torch.randint(0, 3, (4, 5), generator=generator)
        gt[0, 0] = 255
        images.append((torch.randn(count, 4, 5, generator=generator), chosen, gt))
    return images


def evaluate(indices: list[int]) -> list[dict]:
    images = dataset_images()
    summaries = []
    for compat in (False, True):
        scorer = SemanticScorer(["wall", "sky", "road"], lasagna_miou_compat=compat)
        for index in indices:
            logits, names, gt = images[index]
            scorer.update(logits, names, gt, record_id=str(index))
        scorer.reduce()
        summaries.append(scorer.summary())
    return summaries


def rank_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results[rank] = evaluate(shard_indices(len(dataset_images()), rank, WORLD_SIZE))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path) -> None:
    expected = evaluate(list(range(len(dataset_images()))))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD_SIZE, join=True)
        per_rank = dict(results)
    for rank in range(WORLD_SIZE):
        for got, want in zip(per_rank[rank], expected, strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                if isinstance(value, dict):
                    assert got[key].keys() == value.keys()
                    got_values = np.array([np.nan if v is None else v for v in got[key].values()])
                    want_values = np.array([np.nan if v is None else v for v in value.values()])
                    np.testing.assert_allclose(got_values, want_values, rtol=1e-12)
                elif isinstance(value, str):
                    assert got[key] == value
                else:
                    assert got[key] == pytest.approx(value, rel=1e-12), key
