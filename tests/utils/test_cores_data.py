"""CoReS's data on the tiny assets, through tokenization into the tiny model: the cores templates
label only the answers (the in-context example's "ASSISTANT: ..." is prompt), every drawn
segmentation conversation of `--recipe cores` holds one `[SEG_SEMA]` (a single token id) before
its one target token, both labelled, with an answer from CoReS's ANSWER_LIST, and ReasonSeg
validation asks with CoReS's fixed answer. Reference strings: CoReS baoxiaoyi/CoReS@296ee1f
(tests/utils/reference_templates.py, tests/utils/test_conversation.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from model.tiny import build_tiny_segmenter
from model.tokens import IGNORE_INDEX
from tests.utils import reference_templates as ref
from tests.utils.test_collate import labelled_runs
from utils.collate import SampleProcessor, collate, template_for, tokenize_conversation
from utils.config import TrainConfig, parse_args
from utils.datasets.mixer import HybridDataset, build_sources
from utils.datasets.validation import build_validation_set, parse_val_datasets

CHAIN = "[SEG_SEMA]"
DRAWS = 40
BATCH = 4  # images of the batch run through the model
# an explained ReasonSeg answer: a CoReS template, a space, the explanation
EXPLAINED = re.compile("(?:" + "|".join(map(re.escape, ref.CORES_ANSWER_LIST)) + ") .+", re.S)


def cores_config(dataset_dir: Path, *extra: str) -> TrainConfig:
    return parse_args(["--recipe", "cores", f"--dataset_dir={dataset_dir}", "--seed=1", *extra])


@pytest.fixture(scope="module")
def cores_tiny(assets: Path):
    """The tiny segmenter built as `--recipe cores` builds it (the chain token added) and a
    processor with CoReS's template."""
    config = cores_config(assets / "dataset")
    model, tokenizer = build_tiny_segmenter(assets, chain_token=config.chain_token)
    model.eval()
    processor = SampleProcessor.for_model(
        model, tokenizer, str(assets / "llava_tiny"), config.conv_type, config.model_max_length
    )
    return model, tokenizer, processor


@pytest.mark.parametrize("conv_type", ["llava_v1_cores", "llava_llama_2_cores"])
def test_labels_cover_only_the_answers_not_the_in_context_example(cores_tiny, conv_type) -> None:
    model, tokenizer, processor = cores_tiny
    rounds = [
        (
            "<image>\n What is the dog in this image? Please output segmentation mask.",
            ref.CORES_VALIDATION_ANSWER,
        ),
        ("And the cat?", "Sure, it appears on [SEG_SEMA]. The segmentation result is [SEG]."),
    ]
    template = template_for(tokenizer, conv_type)
    input_ids, labels = tokenize_conversation(
        rounds, tokenizer, model.token_ids, processor.image_tokens, template
    )
    gap = " " if "llama_2" in conv_type else ""
    decoded = [tokenizer.decode(run) for run in labelled_runs(input_ids, labels)]
    assert decoded == [f"{answer}{gap}{tokenizer.eos_token}" for _, answer in rounds]
    chain = input_ids == model.token_ids.chain
    assert int(chain.sum()) == 2 and bool((labels[chain] == model.token_ids.chain).all())
    # the example's "ASSISTANT: <answer>" is in the prompt before the first label, unlabelled
    first_label = int(torch.nonzero(labels != IGNORE_INDEX)[0])
    prompt = tokenizer.decode(input_ids[:first_label])
    assert "ASSISTANT: It is usually found on a knife or propeller." in prompt


def test_cores_recipe_draws_reach_the_model_with_one_chain_token_per_target(
    assets: Path, cores_tiny
) -> None:
    model, _, processor = cores_tiny
    ids = model.token_ids
    data = cores_config(assets / "dataset").data_config()
    mix = HybridDataset(build_sources(data), data.sample_rates, DRAWS, data.seed)
    processed, families = [], set()
    for index in range(DRAWS):
        sample = mix[index]
        family = sample.source.split("/")[0]
        families.add(family)
        item = processor(sample)
        processed.append(item)
        for conversation, input_ids, labels in zip(
            sample.conversations, item.input_ids, item.labels, strict=True
        ):
            answer = conversation[0][1]
            targets = torch.isin(input_ids, torch.tensor([ids.seg, ids.rej]))
            chain = input_ids == ids.chain
            if family == "vqa" or not targets.any():  # dialogues and explanation-only answers
                assert not chain.any() and CHAIN not in answer
                continue
            plain = answer.replace("[REJ]", "[SEG]")
            assert plain in ref.CORES_ANSWER_LIST or EXPLAINED.fullmatch(answer), answer
            assert int(chain.sum()) == int(targets.sum()) == 1
            (chain_at,), (target_at,) = torch.nonzero(chain)[0], torch.nonzero(targets)[0]
            assert chain_at < target_at
            assert labels[chain_at] == ids.chain and labels[target_at] == input_ids[target_at]
    assert families == {"sem_seg", "refer_seg", "vqa", "reason_seg"}
    batch = collate(processed[:BATCH], ids.pad)
    with torch.no_grad():
        output = model(batch)
    assert torch.isfinite(output.loss)
    per_image = [
        int((batch.input_ids[batch.conv_image == image] == ids.chain).sum())
        for image in range(BATCH)
    ]
    assert sum(per_image) > 0
    assert [masks.shape[0] for masks in output.coarse_masks] == per_image


def test_reason_seg_validation_asks_with_the_cores_answer(assets: Path, cores_tiny) -> None:
    model, _, processor = cores_tiny
    config = cores_config(assets / "dataset", "--eval_only")
    (entry,) = parse_val_datasets(config.val_dataset)
    dataset = build_validation_set(
        assets / "dataset", entry, config.val_json_name, config.val_answer
    )
    sample = dataset[0]
    ((question, answer),) = sample.conversations[0]
    assert answer == ref.CORES_VALIDATION_ANSWER and question.endswith("segmentation mask.")
    item = processor(sample)
    (input_ids,) = item.input_ids
    assert int((input_ids == model.token_ids.chain).sum()) == 1
    assert int((input_ids == model.token_ids.seg).sum()) == 1 == item.masks.shape[0]
