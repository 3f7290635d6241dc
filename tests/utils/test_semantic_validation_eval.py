"""Semantic-segmentation validation through `utils.evaluation.evaluate` (utils/
semantic_validation.py) and train_ds.py: a tiny model whose LM head is rigged to generate a
known class sequence on the tiny `ade20k|val` images is scored exactly as an independent numpy
composition of its decoded masks against the ground truth (ours and `--lasagna_miou_compat`),
with chunked questions, on one and two ranks, and end to end with `train_ds.py --eval_only`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.checkpoint import save_merged
from model.generate import generate
from model.tiny import build_tiny_segmenter
from model.tokens import TokenIds
from tests.e2e import python
from tests.helpers import evaluate_on_cpu
from utils.collate import SampleProcessor, collate
from utils.conversation import DEFAULT_CONV_TYPE
from utils.datasets.base import IGNORE_LABEL
from utils.evaluation import ValidationJob, build_validation_jobs
from utils.generative_eval import class_items
from utils.inference import Segmentation
from utils.training import RunLogger

# the rigged answer to every question: two present classes of the tiny images, one absent
# class and a name no ADE20K class matches at our threshold (LaSagnA's threshold-free fuzzy
# match takes "box" for it: rapidfuzz WRatio over the 150 names)
ANSWER = "tree[SEG]wall[REJ]tent[SEG]zx[SEG]"
PRESENT, ABSENT, UNMATCHED, COMPAT_MATCH = ["tree", "tent", "zx"], ["wall"], "zx", "box"
IMAGES = 3  # rigged images (whole class list in one question)
CHUNKED_IMAGES, CHUNK = 2, 75  # ADE20K's 150 names in two questions
RIG_MARGIN = 5.0
WORLD_SIZE = 2
TOLERANCE = 1e-9


class FirstImages:
    """The first `count` images of a semantic validation set (same classes)."""

    def __init__(self, dataset, count: int) -> None:
        self.dataset, self.count = dataset, count
        self.name, self.classes = dataset.name, dataset.classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.dataset[index]


def ade20k_job(assets: Path, count: int, chunk: int = 0) -> ValidationJob:
    [job] = build_validation_jobs(assets / "dataset", "ade20k|val", semantic_val_chunk=chunk)
    return replace(job, dataset=FirstImages(job.dataset, count))


def prompt_batch(segmentation: Segmentation, job: ValidationJob):
    """Every (image, question) of `job` as its own generation prompt, through the chat path
    (utils.inference), not the evaluation's own prompt building."""
    samples = [
        segmentation.prepare(sample.image, question)
        for sample in (job.dataset[i] for i in range(len(job.dataset)))
        for question in sample.questions
    ]
    return replace(collate(samples, segmentation.model.token_ids.pad), labels=None, gt_masks=None)


def rig_every_prompt(model, batch, plan: list[int]) -> None:
    """Edit the LM-head rows of the plan's tokens so that greedy generation writes `plan`
    (repeats allowed) for every conversation of `batch` (one image each): teacher-force the
    plan after each prompt, then solve for rows that win by RIG_MARGIN at their own steps and
    lose by RIG_MARGIN elsewhere (tests/helpers.py `rig_greedy_answer`, for several prompts)."""
    tokens = sorted(set(plan))
    states, best = [], []
    with torch.no_grad():
        for row in range(len(batch.input_ids)):
            length = int(batch.attention_mask[row].sum())
            ids = torch.cat([batch.input_ids[row, :length], torch.tensor(plan[:-1])])
            forced = replace(
                batch,
                input_ids=ids[None],
                attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
                conv_image=torch.zeros(1, dtype=torch.long),
                clip_pixels=batch.clip_pixels[row : row + 1],
            )
            hidden = model.hidden_states(forced)[0, length - 1 :]
            others = model.llava.lm_head(hidden)
            others[:, tokens] = -torch.inf
            states.append(hidden)
            best.append(others.max(dim=1).values)
        states, best = torch.cat(states), torch.cat(best)
        chosen = torch.tensor(plan * len(batch.input_ids))
        wins = chosen[None] == torch.tensor(tokens)[:, None]  # [token, state]
        wanted = torch.where(wins, best[None] + RIG_MARGIN, best[None] - RIG_MARGIN)
        model.llava.lm_head.weight[tokens] = wanted @ torch.linalg.pinv(states.T)
    written = generate(model, batch, max_new_tokens=len(plan) + 1).sequences
    assert all(sequence.tolist() == plan for sequence in written)


def rigged_model(assets: Path, job: ValidationJob):
    """(model, segmentation, prompts) with the tiny model rigged to answer ANSWER to `job`'s
    questions."""
    model, tokenizer = build_tiny_segmenter(assets, seed=0, lora_r=0)
    model.eval()
    processor = SampleProcessor.for_model(model, tokenizer, str(assets / "llava_tiny"))
    segmentation = Segmentation(
        model, tokenizer, processor.images, DEFAULT_CONV_TYPE, "cpu", torch.float32
    )
    prompts = prompt_batch(segmentation, job)
    plan = [*tokenizer.encode(ANSWER, add_special_tokens=False), model.token_ids.eos]
    rig_every_prompt(model, prompts, plan)
    return model, processor, prompts


# --- reading a class sequence by token ids ---
IDS = TokenIds(seg=50, rej=51, image=52, pad=0, bos=1, eos=2, im_start=None, im_end=None)
WORDS = {3: "Sure,", 4: " the", 5: " results are", 6: " wall", 7: " traffic", 8: " light"}


def decode_words(ids: list[int]) -> str:
    return "".join(WORDS.get(token, ".") for token in ids)


def test_class_items_are_read_by_token_ids() -> None:
    # "Sure, the results are wall<SEG>traffic light<REJ>. wall<SEG>" then EOS
    tokens = [3, 4, 5, 6, IDS.seg, 7, 8, IDS.rej, 9, 6, IDS.seg, IDS.eos]
    assert class_items(tokens, IDS, decode_words) == [
        ("wall", True),
        ("traffic light", False),
        ("wall", True),
    ]
    # an empty name still answers its target; text after the last target names nothing
    assert class_items([IDS.seg, 6, IDS.rej, 7], IDS, decode_words) == [("", True), ("wall", False)]
    assert class_items([6, 7, IDS.eos], IDS, decode_words) == []


# --- the independent oracle: numpy composition of the decoded masks ---
def oracle_items(model, prompts, job: ValidationJob) -> list[list[np.ndarray]]:
    """Per image, the decoded mask logits [H, W] of its present items, chunk by chunk."""
    generation = generate(model, prompts, max_new_tokens=len(ANSWER))
    chunks = len(job.dataset[0].questions)
    per_image = []
    for image in range(len(job.dataset)):
        masks = []
        for row in range(image * chunks, (image + 1) * chunks):
            present = ~generation.target_is_rej[row]
            masks += [m.numpy().astype(np.float64) for m in generation.pred_masks[row][present]]
        per_image.append(masks)
    return per_image


def standard_prediction(masks, class_ids, num_classes: int, shape) -> np.ndarray:
    """Highest logit among matched masks (first on ties) if > 0, else num_classes."""
    pred = np.full(shape, num_classes, dtype=np.int64)
    best = np.full(shape, -np.inf)
    for logits, class_id in zip(masks, class_ids, strict=True):
        if class_id is None:
            continue
        better = logits > best
        pred[better], best[better] = class_id, logits[better]
    pred[best <= 0] = num_classes
    return pred


def compat_prediction(masks, class_ids, num_classes: int, shape) -> np.ndarray:
    """LaSagnA: channel class_id = clamp(logit, 0), later masks overwrite; argmax over K."""
    channels = np.zeros((num_classes, *shape))
    for logits, class_id in zip(masks, class_ids, strict=True):
        channels[class_id] = np.maximum(logits, 0)
    return channels.argmax(axis=0)


def oracle(assets, model, prompts, job: ValidationJob, compat: bool) -> dict:
    classes = job.dataset.classes
    k = len(classes)
    names = PRESENT * len(job.dataset[0].questions)
    if compat:
        class_ids = [classes.index(COMPAT_MATCH if n == UNMATCHED else n) for n in names]
    else:
        class_ids = [None if n == UNMATCHED else classes.index(n) for n in names]
    size = k if compat else k + 1
    total = np.zeros((size, size), dtype=np.int64)
    per_image = []
    for index, masks in enumerate(oracle_items(model, prompts, job)):
        gt = job.dataset[index].label.astype(np.int64)
        compose = compat_prediction if compat else standard_prediction
        pred = compose(masks, class_ids, k, gt.shape)
        if compat:
            gt = np.where(gt == IGNORE_LABEL, 0, gt)
        scored = gt != IGNORE_LABEL
        confusion = np.bincount(gt[scored] * size + pred[scored], minlength=size * size).reshape(
            size, size
        )
        total += confusion
        per_image.append(confusion)
    return {"confusion": total, "per_image": per_image, "k": k}


def iou_table(confusion: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    inter = np.diag(confusion)[:k].astype(np.float64)
    union = confusion.sum(0)[:k] + confusion.sum(1)[:k] - inter
    return inter, union


def check_against_oracle(result, expected, classes, compat: bool, chunks: int) -> None:
    k = expected["k"]
    inter, union = iou_table(expected["confusion"], k)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    assert result.summary["miou"] == pytest.approx(np.nanmean(iou), abs=TOLERANCE)
    confusion = expected["confusion"]
    accuracy = np.diag(confusion)[:k].sum() / confusion[:k].sum()
    assert result.summary["pixel_accuracy"] == pytest.approx(accuracy, abs=TOLERANCE)
    got = np.array([np.nan if v is None else v for v in result.details["per_class_iou"].values()])
    np.testing.assert_allclose(got, iou, atol=TOLERANCE)
    assert list(result.details["per_class_iou"]) == classes
    images = len(expected["per_image"])
    assert result.summary["generated_names"] == images * chunks * len(PRESENT)
    assert result.summary["unmatched_names"] == (0 if compat else images * chunks)
    for record, confusion in zip(result.records, expected["per_image"], strict=True):
        inter, union = iou_table(confusion, k)
        want = {classes[c]: [int(inter[c]), int(union[c])] for c in np.flatnonzero(union)}
        assert record["classes"] == want
        assert record["names"] == PRESENT * chunks and record["absent"] == ABSENT * chunks
        assert record["texts"] == [ANSWER] * chunks


@pytest.fixture(scope="module")
def rigged(assets):
    job = ade20k_job(assets, IMAGES)
    model, processor, prompts = rigged_model(assets, job)
    return job, model, processor, prompts


def run(model, job, processor, rank=0, world_size=1, **kwargs):
    return evaluate_on_cpu(
        model, job, processor, rank, world_size, max_new_tokens=len(ANSWER), **kwargs
    )


@pytest.mark.parametrize("compat", [False, True])
def test_miou_equals_the_numpy_composition_of_the_decoded_masks(assets, rigged, compat) -> None:
    job, model, processor, prompts = rigged
    result = run(model, job, processor, lasagna_miou_compat=compat)
    assert result.name == "ade20k|val" + (" (lasagna_miou_compat)" if compat else "")
    assert result.details["protocol"] == ("lasagna_compat" if compat else "standard")
    expected = oracle(assets, model, prompts, job, compat)
    check_against_oracle(result, expected, job.dataset.classes, compat, chunks=1)
    # the record names the matched class of each name, None where unmatched
    matched = result.records[0]["matched"]
    assert matched == ["tree", "tent", COMPAT_MATCH if compat else None]


def test_eval_protocol_does_not_apply(rigged) -> None:
    job, model, processor, _ = rigged
    teacher_forced = run(model, job, processor)
    generated = run(model, job, processor, protocol="generate")
    assert generated.name == teacher_forced.name and generated.summary == teacher_forced.summary


def test_chunked_questions_compose_every_chunk(assets) -> None:
    job = ade20k_job(assets, CHUNKED_IMAGES, CHUNK)
    assert len(job.dataset[0].questions) == 2
    model, processor, prompts = rigged_model(assets, job)
    for compat in (False, True):
        result = run(model, job, processor, lasagna_miou_compat=compat, batch_size=2)
        expected = oracle(assets, model, prompts, job, compat)
        check_against_oracle(result, expected, job.dataset.classes, compat, chunks=2)


# --- two ranks (real gloo process group) ---
def rank_worker(rank: int, assets: Path, head: torch.Tensor, init_file: str, shared) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    try:
        model, tokenizer = build_tiny_segmenter(assets, seed=0, lora_r=0)
        with torch.no_grad():
            model.llava.lm_head.weight.copy_(head)
        processor = SampleProcessor.for_model(model, tokenizer, str(assets / "llava_tiny"))
        job = ade20k_job(assets, IMAGES)  # shards of 2 and 1 images: rank 1 pads
        for compat in (False, True):
            result = run(model, job, processor, rank, WORLD_SIZE, lasagna_miou_compat=compat)
            shared[rank, compat] = (result.summary, result.details, result.records)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(assets, rigged, tmp_path) -> None:
    job, model, processor, _ = rigged
    head = model.llava.lm_head.weight.detach().clone()
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(
            rank_worker,
            args=(assets, head, str(tmp_path / "init"), shared),
            nprocs=WORLD_SIZE,
            join=True,
        )
        per_rank = dict(shared)
    for compat in (False, True):
        expected = run(model, job, processor, lasagna_miou_compat=compat)
        for rank in range(WORLD_SIZE):
            summary, details, records = per_rank[rank, compat]
            assert summary.keys() == expected.summary.keys()
            for key, value in expected.summary.items():
                assert summary[key] == pytest.approx(value, abs=TOLERANCE), key
            assert details["protocol"] == expected.details["protocol"]
            want = expected.details["per_class_iou"]
            assert details["per_class_iou"].keys() == want.keys()
            for name, value in want.items():
                got = details["per_class_iou"][name]
                assert got is value is None or got == pytest.approx(value, abs=TOLERANCE), name
            # shards are 0, 2 on rank 0 and 1 on rank 1, gathered rank by rank
            by_id = {record["record_id"]: record for record in records}
            assert len(by_id) == IMAGES
            assert by_id == {record["record_id"]: record for record in expected.records}


# --- train_ds.py end to end and the logging of a semantic summary ---
def test_train_ds_eval_only_writes_the_semantic_outputs(assets, rigged, tmp_path) -> None:
    job, model, processor, _ = rigged
    merged = save_merged(
        model,
        processor.tokenizer,
        tmp_path / "rigged",
        source_version=assets / "llava_tiny",
        conv_type=DEFAULT_CONV_TYPE,
    )
    result = python(
        "train_ds.py",
        f"--version={merged}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={tmp_path}",
        "--exp_name=eval",
        "--val_dataset=ade20k|val||ReasonSeg|val",
        f"--max_new_tokens={len(ANSWER)}",
        "--precision=fp32",
        "--out_dim=32",
        "--workers=0",
        "--eval_only",
    )
    run_dir = tmp_path / "eval"
    [full] = build_validation_jobs(assets / "dataset", "ade20k|val")
    expected = run(model, full, processor)
    written = json.loads((run_dir / "eval_ade20k_val.json").read_text())
    assert written["summary"] == pytest.approx(expected.summary, abs=TOLERANCE)
    assert written["protocol"] == "standard" and len(written["per_class_iou"]) == 150
    records = [json.loads(line) for line in (run_dir / "eval_ade20k_val.jsonl").open()]
    assert len(records) == written["samples"] == len(full.dataset)
    assert [r["names"] for r in records[:IMAGES]] == [PRESENT] * IMAGES
    assert (run_dir / "eval_ReasonSeg_val.json").is_file()
    out = result.stdout
    assert f"miou: {expected.summary['miou']}" in out
    assert "class" in out and "mIoU" in out and "unmatched" in out and "pAcc" in out


def test_a_semantic_summary_is_logged_as_scalars(tmp_path) -> None:
    summary = {"miou": 0.25, "pixel_accuracy": 0.5, "generated_names": 9, "unmatched_names": 3}
    logger = RunLogger(tmp_path, rank=0)
    logger.validation(7, 0, {"ade20k|val": summary, "ReasonSeg|val": {"giou": 0.1}})
    logger.close()
    [record] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert record["results"]["ade20k|val"] == summary


def test_the_best_checkpoint_score_is_the_first_sets_giou_or_miou() -> None:
    from train_ds import first_set_score

    semantic = {"miou": 0.25, "pixel_accuracy": 0.5}
    assert first_set_score({"ade20k|val": semantic, "ReasonSeg|val": {"giou": 0.1}}) == 0.25
    assert first_set_score({"ReasonSeg|val": {"giou": 0.1}, "ade20k|val": semantic}) == 0.1
    assert first_set_score({}) is None
