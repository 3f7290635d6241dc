"""The demo's image-encoder pretraining: labels, token targets, and a short run that lowers its
losses, changes only the encoders and saves files the real loaders read."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from model.mask_models import load_mask_model
from model.tiny import write_tiny_llava, write_tiny_sam
from model.tokens import IGNORE_INDEX
from tools.tiny_assets.common import jpeg_round_trip, write_jpeg
from tools.tiny_assets.pretrain import (
    KIND_INDEX,
    KINDS,
    PART_INDEX,
    PRESENCE_QUESTIONS,
    Batches,
    PretrainOptions,
    answer_token,
    build_pool,
    caption,
    conversation_batch,
    label_maps,
    pretrain_llava,
    pretrain_tiny_models,
    question,
    scene_rounds,
    token_targets,
    yes_no_accuracy,
)
from tools.tiny_assets.shapes_world import COLOURS, OBJECT_SHAPES, generate_scene
from tools.tiny_assets.shapes_world_text import plural, with_article
from utils.preprocess import ImageProcessors


def test_label_maps_mark_each_object_kind_and_part() -> None:
    rng = np.random.default_rng(3)
    scene = next(
        s
        for s in (generate_scene(rng, 64, 64, (3, 4), require_composite=True) for _ in range(9))
        if any(o.parts for o in s.objects)
    )
    kinds, parts = label_maps(scene)
    for obj in scene.objects:
        assert (kinds[obj.mask] == KIND_INDEX[(obj.colour, obj.shape)]).all()
        for part in obj.parts:
            assert (parts[part.mask] == PART_INDEX[part.name]).all()
    background = ~np.logical_or.reduce([o.mask for o in scene.objects])
    assert (kinds[background] == 0).all() and (parts[background] == 0).all()


def test_token_targets_list_kinds_colours_and_shapes_per_patch() -> None:
    red_circle = KIND_INDEX[("red", "circle")]
    blue_star = KIND_INDEX[("blue", "star")]
    kinds = torch.zeros(1, 4, 4, dtype=torch.int64)
    kinds[0, 0, 0] = red_circle  # top-left patch of 2 x 2 pixels
    kinds[0, 3, 3] = blue_star  # bottom-right patch
    kinds[0, 2, 3] = red_circle
    targets = token_targets(kinds, patch=2)
    assert targets.shape == (1, 4, len(KINDS) + len(COLOURS) + len(OBJECT_SHAPES))

    def names(row: torch.Tensor) -> set:
        hot = row.nonzero().flatten().tolist()
        attributes = COLOURS + OBJECT_SHAPES
        return {KINDS[i] if i < len(KINDS) else attributes[i - len(KINDS)] for i in hot}

    assert names(targets[0, 0]) == {("red", "circle"), "red", "circle"}
    assert names(targets[0, 1]) == set() and names(targets[0, 2]) == set()
    assert names(targets[0, 3]) == {("red", "circle"), ("blue", "star"), "red", "blue"} | {
        "circle",
        "star",
    }


def test_short_pretraining_lowers_losses_and_changes_only_the_encoders(tmp_path: Path) -> None:
    llava_dir = write_tiny_llava(tmp_path / "llava")
    sam_path = write_tiny_sam(tmp_path / "sam.pth")
    llava_before = load_file(str(llava_dir / "model.safetensors"))
    sam_before = torch.load(sam_path, weights_only=True)
    options = PretrainOptions(steps=120, clip_steps=60, batch_size=8, lr=5e-3, pool_size=64)
    result = pretrain_tiny_models(llava_dir, sam_path, options)
    for loss in ("clip_tokens", "sam_kinds", "sam_parts"):
        assert result[f"last_{loss}"] < 0.8 * result[f"first_{loss}"], (loss, result)
    # the CLIP stage goes on from where the joint one ended, and lowers the loss further
    assert result["clip_stage_first_clip_tokens"] < result["first_clip_tokens"], result
    assert result["clip_stage_last_clip_tokens"] < result["clip_stage_first_clip_tokens"]
    llava_after = load_file(str(llava_dir / "model.safetensors"))
    assert llava_after.keys() == llava_before.keys()
    changed = {k for k in llava_before if not torch.equal(llava_before[k], llava_after[k])}
    assert changed and all(k.startswith("vision_tower.") for k in changed), changed
    # the layer after the one LLaVA reads gets no gradient: it stays as it was
    assert not any(".layers.1." in k for k in changed)
    sam_after = torch.load(sam_path, weights_only=True)
    changed = {k for k in sam_before if not torch.equal(sam_before[k], sam_after[k])}
    assert changed and all(k.startswith("image_encoder.") for k in changed), changed
    assert load_mask_model(sam_path).vision_encoder.training is False


def test_no_pretraining_without_steps_and_negative_steps_refused(tmp_path: Path) -> None:
    from tools.make_tiny_assets import make_tiny_assets

    with pytest.raises(
        ValueError,
        match="pretrain_steps \\(-1\\), clip_steps \\(0\\) and llava_steps \\(0\\) must be 0",
    ):
        make_tiny_assets(tmp_path, families=["grefcoco"], pretrain_steps=-1)
    for steps in ({"llava_steps": 10}, {"clip_steps": 10}):
        with pytest.raises(ValueError, match="llava_steps and clip_steps need pretrain_steps"):
            make_tiny_assets(tmp_path, families=["grefcoco"], **steps)
    out = make_tiny_assets(tmp_path, families=["grefcoco"], pretrain_steps=0)
    reference = write_tiny_llava(tmp_path / "reference")
    after = load_file(str(out / "llava_tiny" / "model.safetensors"))
    before = load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_captions_list_every_object_from_left_to_right() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = generate_scene(rng, 64, 64, (2, 5))
        listed = caption(scene).removeprefix("From left to right: ").removesuffix(".")
        ordered = sorted(scene.objects, key=lambda obj: obj.centre[0])
        assert re.split(r", | and ", listed) == [with_article(obj.name) for obj in ordered]
        assert len(ordered) == len(scene.objects) >= 2


def test_conversation_batch_renders_the_segmentation_template_with_the_loss_on_answers(
    tmp_path: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_llava(tmp_path / "llava"))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    conversations = [
        [("<image>\nWhich of these are in the image: the red circle?", "the red circle: yes.")],
        [
            ("<image>\nWhich of these are in the image: a star, a car?", "a star: no, a car: no."),
            ("Describe the image from left to right.", "From left to right: a red circle."),
        ],
    ]
    batch = conversation_batch(tokenizer, conversations, 4, image_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and mask[0].sum() < mask[1].sum()
    text = tokenizer.decode(ids[1][mask[1].bool()])
    assert text.startswith("<s> A chat between") and text.count("<image>") == 4
    assert "ASSISTANT: a star: no, a car: no.</s>USER: Describe" in text
    answers = tokenizer.decode(labels[1][labels[1] != IGNORE_INDEX])
    assert answers == "a star: no, a car: no.</s> From left to right: a red circle.</s>"
    assert ids[0][mask[0] == 0].eq(tokenizer.pad_token_id or 0).all()
    assert labels[0][mask[0] == 0].eq(IGNORE_INDEX).all()
    first = labels[0][labels[0] != IGNORE_INDEX]
    assert tokenizer.decode(first) == "the red circle: yes.</s>"


def test_llava_pretraining_trains_the_projector_and_language_model_not_clip(
    tmp_path: Path,
) -> None:
    llava_dir = write_tiny_llava(tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    before = {name: p.detach().clone() for name, p in llava.named_parameters()}
    options = PretrainOptions(batch_size=8, pool_size=32, llava_steps=60, llava_lr=3e-3)
    pool = build_pool(options)
    processors = ImageProcessors.from_pretrained(llava_dir, sam_image_size=64)
    batches = Batches(pool, processors)
    losses = [row["llava"] for row in pretrain_llava(llava, tokenizer, batches, options)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses
    changed = {n for n, p in llava.named_parameters() if not torch.equal(before[n], p)}
    assert not any(".vision_tower." in name for name in changed)
    assert any(".multi_modal_projector." in name for name in changed)
    assert any(".language_model." in name for name in changed) and "lm_head.weight" in changed


def test_jpeg_round_trip_equals_writing_and_reading_the_file(tmp_path: Path) -> None:
    image = generate_scene(np.random.default_rng(2), 64, 48, (2, 3)).image
    write_jpeg(tmp_path / "scene.jpg", image)
    from_file = cv2.cvtColor(cv2.imread(str(tmp_path / "scene.jpg")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(jpeg_round_trip(image), from_file)
    assert not np.array_equal(jpeg_round_trip(image), image)  # it is lossy: the test can fail


def names_asked(question_text: str, form: str) -> str | None:
    """The names a presence question in `form` asks about, None if it has another form."""
    prefix, suffix = ("<image>\n" + form).split("{names}")
    if question_text.startswith(prefix) and question_text.endswith(suffix):
        return question_text.removeprefix(prefix).removesuffix(suffix)
    return None


def test_questions_answer_yes_exactly_for_what_the_scene_holds() -> None:
    rng = np.random.default_rng(8)
    plurals = {plural(shape): shape for shape in OBJECT_SHAPES}
    answers, forms, counts, wordings = [], [], [], set()
    for _ in range(60):
        scene = generate_scene(rng, 64, 64, (2, 5))
        (asked, said), (describe, described) = scene_rounds(scene, rng, (4, 8))
        form = next(f for f in PRESENCE_QUESTIONS if names_asked(asked, f) is not None)
        names = names_asked(asked, form)
        wordings.add(form)
        items = [item.rsplit(": ", 1) for item in said.removesuffix(".").split(", ")]
        assert [name for name, _ in items] == names.split(", ") and said.endswith(".")
        assert len(set(names.split(", "))) == len(items) <= 8 and described == caption(scene)
        assert describe == "Describe the image from left to right."
        counts.append(len(items))
        for name, answer in items:
            words = name.removeprefix("the ").split()
            if name.endswith(" things"):
                holds, form = any(o.colour == words[0] for o in scene.objects), "colour"
            elif len(words) == 1:
                holds, form = any(o.shape == plurals[words[0]] for o in scene.objects), "shape"
            else:
                holds, form = scene.has(words[0], words[1]), "kind"
            assert holds == (answer == "yes"), (said, scene.objects)
            answers.append(answer)
            forms.append(form)
    assert min(counts) == 4 and max(counts) == 8 and len(wordings) == len(PRESENCE_QUESTIONS)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    assert 0.4 < forms.count("kind") / len(forms) < 0.6 and min(map(forms.count, forms)) > 40


def test_absent_kinds_in_questions_are_near_misses_when_the_scene_allows() -> None:
    rng = np.random.default_rng(4)
    near_misses = 0
    for _ in range(200):
        scene = generate_scene(rng, 64, 64, (2, 5))
        name, present = question(scene, rng)
        words = name.removeprefix("the ").split()
        if present or name.endswith(" things") or len(words) == 1:
            continue
        colour, shape = words
        near_misses += any(o.colour == colour for o in scene.objects) and any(
            o.shape == shape for o in scene.objects
        )
    assert near_misses > 20


def test_pool_keeps_uint8_scenes_and_preprocesses_them_as_the_dataset_images(
    tmp_path: Path,
) -> None:
    options = PretrainOptions(pool_size=4, questions=(2, 2))
    pool = build_pool(options)
    assert pool.images.dtype == np.uint8 and pool.images.shape == (4, 64, 64, 3)
    assert pool.kinds.shape == pool.parts.shape == (4, 64, 64) and pool.kinds.max() > 0
    for (_, said), (_, described) in pool.conversations:
        assert len(re.findall(r": (yes|no)", said)) == 2 and described.endswith(".")
    again = build_pool(options)
    assert np.array_equal(again.images, pool.images) and again.conversations == pool.conversations
    held_out = build_pool(options, stream=1)
    assert not np.array_equal(held_out.images, pool.images)
    processors = ImageProcessors.from_pretrained(write_tiny_llava(tmp_path / "llava"), 64)
    batch = Batches(pool, processors)(torch.tensor([2, 0]))
    image = processors(pool.images[2])
    assert torch.equal(batch.clip[0], image.vision) and torch.equal(batch.sam[0], image.sam)
    assert batch.conversations == [pool.conversations[2], pool.conversations[0]]
    assert batch.sam_kinds.shape == (2, 64, 64) and batch.clip_kinds.dtype == torch.int64


def test_yes_no_accuracy_reads_the_answer_after_each_colon(tmp_path: Path) -> None:
    llava_dir = write_tiny_llava(tmp_path / "llava")
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    config = LlavaForConditionalGeneration.from_pretrained(llava_dir).config
    yes, no = answer_token(tokenizer, "yes"), answer_token(tokenizer, "no")
    assert yes != no

    class SaysYes:
        """Puts "yes" above "no" at every position."""

        def __init__(self) -> None:
            self.config = config

        def __call__(self, input_ids: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., yes] = 1.0
            return SimpleNamespace(logits=logits)

    question = "<image>\nWhich of these are in the image: the red circle, the red star?"
    conversations = [
        [(question, "the red circle: yes, the red star: no.")],
        [(question, "the red circle: no, the red star: yes.")],
    ]
    batch = SimpleNamespace(clip=torch.zeros(2, 3, 64, 64), conversations=conversations)
    assert yes_no_accuracy(SaysYes(), tokenizer, batch) == pytest.approx(2 / 4)
