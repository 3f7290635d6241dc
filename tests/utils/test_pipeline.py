"""End to end on the tiny assets: every training family through HybridDataset (also with
conversations cut to --model_max_length), and every validation set, into a Batch that the tiny
model consumes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.tiny import build_tiny_segmenter
from utils.collate import SampleProcessor, collate
from utils.datasets.base import SamplingOptions
from utils.datasets.mixer import DataConfig, HybridDataset, build_sources
from utils.datasets.validation import build_validation_set, parse_val_datasets

FAMILY_DATA = {
    "sem_seg": "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
    "refer_seg": "refclef||refcoco||refcoco+||refcocog||grefcoco",
    "vqa": "llava_instruct_150k",
    "reason_seg": "ReasonSeg|train",
    "multi_part_reason_seg": "MMR_train.json",
}
ITEMS = 6


@pytest.fixture(scope="module")
def tiny(assets):
    model, tokenizer = build_tiny_segmenter(assets)
    model.eval()
    processor = SampleProcessor.for_model(model, tokenizer, str(assets / "llava_tiny"))
    return model, tokenizer, processor


def run_model(model, processed: list) -> None:
    """Collate, forward, and check the routing of targets and masks."""
    batch = collate(processed, model.token_ids.pad)
    with torch.no_grad():
        output = model(batch)
    assert torch.isfinite(output.loss)
    assert [mask.shape for mask in output.pred_masks] == [mask.shape for mask in batch.gt_masks]
    tokens = torch.isin(batch.input_ids, torch.tensor([model.token_ids.seg, model.token_ids.rej]))
    assert int(tokens.sum()) == sum(mask.shape[0] for mask in batch.gt_masks)
    return batch, output


def one_family(assets, family: str, options: SamplingOptions | None = None) -> DataConfig:
    """The mix of one family of the tiny assets, all its sub-datasets."""
    return DataConfig(
        dataset_dir=assets / "dataset",
        dataset=(family,),
        sample_rates=(1,),
        family_data={family: tuple(FAMILY_DATA[family].split("||"))},
        options=options or SamplingOptions(),
    )


@pytest.mark.parametrize("family", sorted(FAMILY_DATA))
@pytest.mark.parametrize("style", ["mmr", "lisa", "gsva"])
def test_every_training_family_reaches_the_model(assets, tiny, family, style) -> None:
    model, _, processor = tiny
    config = one_family(assets, family, SamplingOptions(prompt_style=style))
    dataset = HybridDataset(build_sources(config), [1], length=ITEMS, process=processor)
    batch, output = run_model(model, [dataset[index] for index in range(ITEMS)])
    if family == "vqa":
        assert output.mask_loss.item() == 0
    else:
        assert output.mask_loss.item() > 0
    assert batch.sources and all(source.startswith(f"{family}/") for source in batch.sources)


VALIDATION = [
    ("ReasonSeg|val", ""),
    ("refcoco|unc|val", ""),
    ("refcoco+|unc|testA", ""),
    ("refcocog|umd|test", ""),
    ("refclef|unc|testB", ""),
    ("grefcoco|unc|val", ""),
    ("MultiPartReasonSeg|val", "MMR_val.json"),
    ("MultiPartReasonSeg|val", "MMR_test_obj_only.json"),
    ("MultiPartReasonSeg|val", "MMR_test_part_only.json"),
    ("MultiPartReasonSeg|val", "MMR_test_mixed.json"),
    ("RefCOCOm|val", "refcocom_val.json"),
]


@pytest.mark.parametrize(("entry", "json_name"), VALIDATION)
def test_every_validation_set_reaches_the_model(assets, tiny, entry, json_name) -> None:
    model, _, processor = tiny
    [parsed] = parse_val_datasets(entry)
    dataset = build_validation_set(assets / "dataset", parsed, json_name)
    assert len(dataset) > 0
    samples = [dataset[index] for index in range(min(3, len(dataset)))]
    for sample in samples:
        assert len(sample.target_names) == sample.masks.shape[0]
    batch, _ = run_model(model, [processor(sample) for sample in samples])
    if entry.startswith("grefcoco"):
        empty = [bool((m.flatten(1) == 0).all(1).any()) for m in batch.gt_masks]
        assert any(empty), "gRefCOCO validation should hold no-target expressions"


def target_rows(input_ids: list[torch.Tensor], limit: int, targets: torch.Tensor) -> list[int]:
    """Mask rows of the [SEG]/[REJ] tokens among each conversation's first `limit` tokens."""
    rows, offset = [], 0
    for ids in input_ids:
        is_target = torch.isin(ids, targets)
        rows += range(offset, offset + int(is_target[:limit].sum()))
        offset += int(is_target.sum())
    return rows


@pytest.mark.parametrize("family", ["vqa", "sem_seg", "multi_part_reason_seg"])
def test_truncated_conversations_reach_the_model(assets, tiny, family) -> None:
    """--too_long truncate at the median conversation length: the same samples, each
    conversation its first `limit` tokens, the masks of the targets left, and a batch the model
    takes ([SEG]/[REJ] tokens = masks, checked by run_model)."""
    model, _, processor = tiny
    config = one_family(assets, family)
    whole = HybridDataset(build_sources(config), [1], length=ITEMS, process=processor)
    full = [whole[index] for index in range(ITEMS)]
    lengths = sorted(len(ids) for sample in full for ids in sample.input_ids)
    limit = lengths[len(lengths) // 2]
    cut_processor = replace(processor, model_max_length=limit, too_long="truncate")
    cut_set = HybridDataset(build_sources(config), [1], length=ITEMS, process=cut_processor)
    cut = [cut_set[index] for index in range(ITEMS)]
    targets = torch.tensor([model.token_ids.seg, model.token_ids.rej])
    for before, after in zip(full, cut, strict=True):
        assert after.image_path == before.image_path
        assert [ids.tolist() for ids in after.input_ids] == [
            ids[:limit].tolist() for ids in before.input_ids
        ]
        assert after.truncated_conversations == sum(len(i) > limit for i in before.input_ids)
        rows = target_rows(before.input_ids, limit, targets)
        assert torch.equal(after.masks, before.masks[rows])
    assert sum(sample.truncated_conversations for sample in cut) > 0
    lost = sum(len(sample.masks) for sample in full) - sum(len(sample.masks) for sample in cut)
    assert lost > 0 if family != "vqa" else lost == 0  # cut [SEG]s took their masks along
    batch, _ = run_model(model, cut)
    assert batch.truncated_conversations == sum(sample.truncated_conversations for sample in cut)
