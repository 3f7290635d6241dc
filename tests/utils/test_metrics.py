"""Metrics on hand-built cases: pixel counts, LISA gIoU/cIoU, GSVA gRefCOCO, decisions from
logits, semantic mIoU, sharding and a real two-rank gloo reduction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.batch import Batch
from utils.metrics import (
    CIOU,
    GIOU,
    MIOU,
    N_ACC,
    T_ACC,
    TARGETS,
    GresAccumulator,
    MaskIoUAccumulator,
    SemanticIoUAccumulator,
    accumulator_for,
    format_table,
    gather_records,
    intersection_union,
    predicted_present,
    shard_indices,
    target_stats,
)

ON, OFF = 5.0, -5.0  # mask logits
IGNORE = 255
WORLD_SIZE = 2


def logits_of(binary: list[list[list[int]]]) -> torch.Tensor:
    """[k, H, W] logits from a 0/1 nested list."""
    mask = torch.tensor(binary, dtype=torch.bool)
    return torch.where(mask, ON, OFF)


def gt_of(values: list[list[list[int]]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_intersection_union_counts_foreground_and_skips_ignore():
    pred = logits_of([[[1, 1, 0], [1, 0, 0]]])
    gt = gt_of([[[1, 0, 1], [IGNORE, 0, 0]]])
    inter, union = intersection_union(pred, gt)
    # the predicted pixel under IGNORE counts nowhere
    assert inter.tolist() == [1] and union.tolist() == [3]
    assert inter.dtype == torch.int64


def test_ignore_pixels_excluded_from_giou():
    pred = logits_of([[[1, 1], [1, 1]]])
    gt = gt_of([[[1, 1], [IGNORE, IGNORE]]])
    acc = MaskIoUAccumulator()
    acc.update(target_stats(pred, gt))
    assert acc.summary()[GIOU] == pytest.approx(1.0, abs=1e-5)


def test_empty_prediction_and_empty_target_is_iou_one():
    acc = MaskIoUAccumulator()
    acc.update(target_stats(logits_of([[[0, 0], [0, 0]]]), gt_of([[[0, 0], [0, 0]]])))
    summary = acc.summary()
    assert summary[GIOU] == 1.0
    assert summary[CIOU] == 0.0 and summary[TARGETS] == 1
    assert acc.records[0]["empty_gt"] is True and acc.records[0]["iou"] == 1.0


def test_cumulative_and_mean_iou_differ():
    # target A: 1 of 1 pixel right (IoU 1); target B: 1 pixel hit, union 9 (IoU 1/9)
    pred_a = [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    pred_b = [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    gt_b = [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    acc = MaskIoUAccumulator()
    acc.update(
        target_stats(logits_of([pred_a, pred_b]), gt_of([pred_a, gt_b])),
        record_id="img1",
        target_names=["a", "b"],
    )
    summary = acc.summary()
    assert summary[GIOU] == pytest.approx((1 / (1 + 1e-5) + 1 / (9 + 1e-5)) / 2)
    assert summary[GIOU] == pytest.approx(5 / 9, rel=1e-4)
    assert summary[CIOU] == pytest.approx(2 / 10)
    assert [r["target"] for r in acc.records] == ["a", "b"]
    assert acc.records[1] == {
        "record_id": "img1",
        "target": "b",
        "iou": pytest.approx(1 / 9, rel=1e-4),
        "intersection": 1,
        "union": 9,
        "empty_gt": False,
        "predicted_present": None,
    }


def test_gt_with_unexpected_values_is_rejected():
    with pytest.raises(ValueError, match="only 0, 1 and 255"):
        intersection_union(logits_of([[[1, 0]]]), gt_of([[[1, 2]]]))
    with pytest.raises(ValueError, match="must both be"):
        intersection_union(logits_of([[[1, 0]]]), gt_of([[[1, 0, 0]]]))


def gres_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four targets (pass-2 masks, decisions from pass 1):
    0 empty GT, REJ predicted (mask has 2 px)   -> IoU 1, N-acc hit, nothing added to cIoU
    1 non-empty GT, REJ predicted (I 1, U 3)    -> IoU 1/3 from the mask, T-acc miss
    2 empty GT, SEG predicted (mask has 3 px)   -> IoU 0, N-acc miss, U += 3
    3 non-empty GT, SEG predicted (I 2, U 2)    -> IoU 1, T-acc hit
    """
    pred = logits_of(
        [
            [[1, 1, 0], [0, 0, 0]],
            [[1, 1, 0], [0, 0, 0]],
            [[1, 1, 1], [0, 0, 0]],
            [[0, 0, 0], [1, 1, 0]],
        ]
    )
    gt = gt_of(
        [
            [[0, 0, 0], [0, 0, 0]],
            [[1, 0, 1], [0, 0, 0]],
            [[0, 0, 0], [0, 0, 0]],
            [[0, 0, 0], [1, 1, 0]],
        ]
    )
    present = torch.tensor([False, False, True, True])
    return pred, gt, present


def test_gres_metrics_on_rej_and_false_positive_targets():
    pred, gt, present = gres_case()
    acc = GresAccumulator()
    acc.update(target_stats(pred, gt), present, record_id="7", target_names=list("abcd"))
    summary = acc.summary()
    ious = [1.0, 1 / (3 + 1e-8), 0.0, 2 / (2 + 1e-8)]
    assert [r["iou"] for r in acc.records] == pytest.approx(ious)
    assert summary[GIOU] == pytest.approx(sum(ious) / 4)
    # non-empty targets give I 1 + 2, U 3 + 2; the empty target called SEG adds its 3 pixels
    assert summary[CIOU] == pytest.approx(3 / (5 + 3))
    assert summary[N_ACC] == 0.5 and summary[T_ACC] == 0.5
    assert [r["predicted_present"] for r in acc.records] == [False, False, True, True]
    assert [r["empty_gt"] for r in acc.records] == [True, False, True, False]


def test_refzom_cumulative_iou_leaves_out_absent_targets_called_present():
    """GSVA's solver adds the predicted area of an empty target called SEG to cIoU's union for
    gRefCOCO only; RefZOM scores the same case with I 1 + 2 over U 3 + 2."""
    pred, gt, present = gres_case()
    refzom, grefcoco = accumulator_for("refzom"), accumulator_for("grefcoco")
    for acc in (refzom, grefcoco):
        acc.update(target_stats(pred, gt), present)
    assert refzom.summary()[CIOU] == pytest.approx(3 / 5)
    assert grefcoco.summary()[CIOU] == pytest.approx(3 / (5 + 3))
    for metric in (GIOU, N_ACC, T_ACC):
        assert refzom.summary()[metric] == grefcoco.summary()[metric]


def test_gres_rates_are_none_without_a_denominator():
    acc = GresAccumulator()
    acc.update(target_stats(logits_of([[[0, 0]]]), gt_of([[[0, 0]]])), torch.tensor([False]))
    summary = acc.summary()
    assert summary[GIOU] == 1.0 and summary[N_ACC] == 1.0 and summary[T_ACC] is None
    empty = GresAccumulator().summary()
    assert empty[GIOU] is None and empty[CIOU] is None and empty[N_ACC] is None


OTHER = 3
VOCAB = 10


def test_decisions_follow_the_argmax_before_each_target():
    # imported here so the spawned ranks below need not import transformers
    from model.tokens import TokenIds

    tokens = TokenIds(seg=7, rej=8, image=9, pad=0, bos=1, eos=2, im_start=None, im_end=None)
    # conversation 0 (image 0): "4 [SEG] 5 [REJ] 2"; conversation 1 (image 1): "4 [REJ] [SEG] 2"
    input_ids = torch.tensor([[4, 7, 5, 8, 2], [4, 8, 7, 2, 0]])
    logits = torch.zeros(2, 5, VOCAB)
    logits[0, 0, tokens.seg] = 1.0  # GT [SEG], predicts SEG    -> present
    logits[0, 2, OTHER] = 1.0  # GT [REJ], predicts another -> present (not REJ)
    logits[1, 0, tokens.rej] = 1.0  # GT [REJ], predicts REJ    -> absent
    logits[1, 1, OTHER] = 1.0  # GT [SEG], predicts another -> absent (not SEG)
    batch = Batch(
        input_ids=input_ids,
        attention_mask=input_ids != tokens.pad,
        conv_image=torch.tensor([0, 1]),
        clip_pixels=torch.zeros(2, 3, 1, 1),
        sam_pixels=torch.zeros(2, 3, 1, 1),
        resized_sizes=torch.ones(2, 2, dtype=torch.long),
        original_sizes=torch.ones(2, 2, dtype=torch.long),
    )
    output = SimpleNamespace(logits=logits, pred_masks=[torch.zeros(2, 1, 1)] * 2)
    decisions = predicted_present(batch, output, tokens)
    assert [d.tolist() for d in decisions] == [[True, True], [False, False]]
    output.pred_masks = [torch.zeros(1, 1, 1), torch.zeros(3, 1, 1)]
    with pytest.raises(ValueError, match="do not match"):
        predicted_present(batch, output, tokens)


def test_semantic_miou_three_classes():
    gt = torch.tensor([[0, 0, 1], [1, 1, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    acc = SemanticIoUAccumulator(num_classes=3)
    acc.update(pred, gt)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 1/2;
    # class 2: only predicted under IGNORE -> no union, left out of the mean
    assert acc.class_iou()[:2].tolist() == pytest.approx([1 / 3, 1 / 2])
    assert acc.class_iou()[2].isnan()
    assert acc.summary()[MIOU] == pytest.approx((1 / 3 + 1 / 2) / 2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_indices_cover_every_index_once(world_size):
    for n in range(10):
        shards = [shard_indices(n, rank, world_size) for rank in range(world_size)]
        assert sorted(i for shard in shards for i in shard) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_indices(3, world_size, world_size)


def test_reduce_is_once_and_closes_updates():
    acc = MaskIoUAccumulator()
    acc.reduce()
    with pytest.raises(RuntimeError, match="twice"):
        acc.reduce()
    with pytest.raises(RuntimeError, match="after reduce"):
        acc.update(target_stats(logits_of([[[1]]]), gt_of([[[1]]])))


def test_format_table_rows_and_blanks():
    table = format_table(
        {
            "ReasonSeg|val": {GIOU: 0.5, CIOU: 0.25},
            "grefcoco|unc|val": {GIOU: 0.6643, CIOU: 0.6319, N_ACC: 0.6256, T_ACC: None},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "gIoU", "cIoU", "N-acc", "T-acc"]
    assert lines[1].split() == ["ReasonSeg|val", "50.00", "25.00"]
    assert lines[2].split() == ["grefcoco|unc|val", "66.43", "63.19", "62.56"]
    assert "mIoU" in format_table({"ade20k": {MIOU: 0.1}})


def test_accumulator_for_picks_the_protocol():
    assert isinstance(accumulator_for("grefcoco"), GresAccumulator)
    assert isinstance(accumulator_for("refzom"), GresAccumulator)
    assert isinstance(accumulator_for("MultiPartReasonSeg"), MaskIoUAccumulator)


# ---- two real ranks ----------------------------------------------------------------------


def dataset_samples() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Five images (pred logits, gt, decisions) with varied targets."""
    pred, gt, present = gres_case()
    generator = torch.Generator().manual_seed(0)
    samples = [(pred[i : i + 1], gt[i : i + 1], present[i : i + 1]) for i in range(4)]
    random_pred = torch.randn(2, 4, 4, generator=generator)
    random_gt = (torch.rand(2, 4, 4, generator=generator) > 0.5).to(torch.uint8)
    samples.append((random_pred, random_gt, torch.tensor([True, False])))
    return samples


def evaluate(indices: list[int]) -> tuple[dict, dict, dict, list]:
    samples = dataset_samples()
    lisa, gres, semantic = MaskIoUAccumulator(), GresAccumulator(), SemanticIoUAccumulator(2)
    for index in indices:
        pred, gt, present = samples[index]
        stats = target_stats(pred, gt)
        lisa.update(stats, record_id=str(index))
        gres.update(stats, present, record_id=str(index))
        semantic.update((pred > 0).long(), gt)
    for acc in (lisa, gres, semantic):
        acc.reduce()
    return lisa.summary(), gres.summary(), semantic.summary(), gather_records(gres.records)


def rank_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results[rank] = evaluate(shard_indices(len(dataset_samples()), rank, WORLD_SIZE))
        # one sample: rank 1 gets none and still takes part in every reduction
        results[rank, "one"] = evaluate(shard_indices(1, rank, WORLD_SIZE))
    finally:
        dist.destroy_process_group()


def test_two_rank_reduction_equals_one_process(tmp_path):
    expected = evaluate(list(range(len(dataset_samples()))))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD_SIZE, join=True)
        per_rank = dict(results)
    expected_one = evaluate([0])
    for rank in range(WORLD_SIZE):  # shards of 3 and 2 images, then of 1 and 0
        assert_same_results(per_rank[rank], expected)
        assert_same_results(per_rank[rank, "one"], expected_one)


def assert_same_results(got: tuple, want: tuple) -> None:
    *summaries, records = got
    for got_summary, want_summary in zip(summaries, want[:3], strict=True):
        assert got_summary.keys() == want_summary.keys()
        for key, value in want_summary.items():
            if value is None:
                assert got_summary[key] is None, key
            else:
                assert got_summary[key] == pytest.approx(value, rel=1e-12), key
    assert sorted(r["record_id"] for r in records) == sorted(r["record_id"] for r in want[3])
