"""Qwen2.5-VL and Qwen3-VL as the backbone, each on its tiny model in its real on-disk format:
the directory, the dynamic-resolution image transform against transformers' own image
processor, ChatML tokenization and labels, the segmenter against an independent composition
(the family's own forward on each conversation, the projector, the decoder), and generation
with the KV cache against the family's own positions and `generate`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.backbone import (
    QWEN2_5_VL,
    QWEN3_VL,
    Family,
    directory_family,
    encoder_outputs,
    image_features,
    image_token_count,
    language_model_step,
    next_positions,
    per_conversation,
    prompt_positions,
    rope_positions,
)
from model.builder import build_segmenter
from model.generate import generate, left_pad
from model.layouts import Layout, detect_layout
from model.packing import pack, pack_rope_positions, unpack
from model.sam2 import is_tracking_key
from model.tiny import (
    TINY_QWEN3_IMAGE_SETTINGS,
    TINY_QWEN_IMAGE_SETTINGS,
    build_tiny_qwen_tokenizer,
    build_tiny_segmenter,
    qwen2_5_vl_config,
    tiny_model_config,
    write_tiny_qwen_vl,
    write_tiny_sam,
)
from tests.helpers import reference_mask
from tests.sam2_oracle import (
    OFFICIAL_CONFIG,
    TINY_OVERRIDES,
    official_decode,
    official_features,
    official_sam2,
)
from train_ds import main
from utils.collate import (
    SampleProcessor,
    backbone_conv_type,
    collate,
    template_for,
    tokenize_prompt,
)
from utils.datasets.base import Sample
from utils.generative_eval import prompt_batch
from utils.preprocess import ImageProcessors, PatchTransform, with_pixel_budget


@dataclass(frozen=True)
class Spec:
    """What each tiny family's files and images give (grids written from smart_resize by hand:
    90 x 130 and 200 x 60 px at 28 resp. 32 px per token)."""

    family: Family
    model_class: type
    settings: dict
    conv_type: str
    grids: list[list[int]]
    system_turn: str


SPECS = {
    "qwen2_5_vl": Spec(
        QWEN2_5_VL,
        Qwen2_5_VLForConditionalGeneration,
        TINY_QWEN_IMAGE_SETTINGS,
        "qwen2_vl",
        [[1, 6, 10], [1, 14, 4]],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    ),
    "qwen3_vl": Spec(
        QWEN3_VL,
        Qwen3VLForConditionalGeneration,
        TINY_QWEN3_IMAGE_SETTINGS,
        "qwen3_vl",
        [[1, 6, 8], [1, 12, 4]],
        "",
    ),
}
# (height, width): upscaled to the minimum budget, inside it, downscaled to the maximum, tall
IMAGE_SIZES = [(20, 30), (90, 130), (300, 420), (200, 60)]
CONVERSATIONS = [
    [("<image>\nCan you segment the red circle and the blue square?", "Sure, [SEG] and [SEG].")],
    [("<image>\nWhere are the circle and the dog?", "The circle is [SEG], the dog is [REJ].")],
    [("<image>\nWhat is the star in this image?", "It is [SEG].")],
]
TOLERANCE = 1e-4


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def sample(height: int, width: int, conversations, seed: int = 0) -> Sample:
    targets = sum(a.count("[SEG]") + a.count("[REJ]") for c in conversations for _, a in c)
    masks = np.random.default_rng(seed + 1).integers(0, 2, (targets, height, width))
    return Sample(
        image=random_image(height, width, seed),
        conversations=conversations,
        masks=masks.astype(np.uint8),
        image_path=f"image_{seed}.png",
        source="test",
    )


@pytest.fixture(scope="module", params=sorted(SPECS))
def qwen(request, tmp_path_factory):
    """(model, tokenizer, directory, spec) of one tiny Qwen-VL family."""
    directory = tmp_path_factory.mktemp(f"{request.param}_assets")
    model, tokenizer = build_tiny_segmenter(directory, seed=0, backbone=request.param)
    version = tiny_model_config(directory, request.param).version
    return model, tokenizer, version, SPECS[request.param]


@pytest.fixture(scope="module")
def processor(qwen):
    model, tokenizer, version, spec = qwen
    return SampleProcessor.for_model(model, tokenizer, version, conv_type=spec.conv_type)


@pytest.fixture(scope="module")
def batch(qwen, processor):
    model = qwen[0]
    samples = [
        sample(90, 130, CONVERSATIONS[:2], seed=0),
        sample(200, 60, CONVERSATIONS[2:], seed=1),
    ]
    return collate([processor(item) for item in samples], model.token_ids.pad)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny LLaVA segmenter (for the family contrasts)."""
    return build_tiny_segmenter(tiny_dir, seed=0)


def test_the_tiny_directory_is_a_directory_of_its_family(qwen) -> None:
    """Plain transformers reads it with the family's own classes; our layout detection and
    family come from its config.json."""
    _, _, version, spec = qwen
    config = AutoConfig.from_pretrained(version)
    assert config.model_type == spec.family.name
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    tokenizer = AutoTokenizer.from_pretrained(version)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    version_path = Path(version)
    settings = json.loads((version_path / "preprocessor_config.json").read_text())
    assert settings == spec.settings
    assert detect_layout(version_path) is Layout.HF_LLAVA
    assert directory_family(version_path) is spec.family
    assert image_token_count(config) is None
    assert type(spec.model_class.from_pretrained(version)) is spec.model_class


@pytest.mark.parametrize("settings", [TINY_QWEN_IMAGE_SETTINGS, TINY_QWEN3_IMAGE_SETTINGS])
@pytest.mark.parametrize(("height", "width"), IMAGE_SIZES)
def test_patches_equal_transformers_image_processor(settings, height, width) -> None:
    ours = PatchTransform.from_settings(settings, Path("preprocessor_config.json"))
    keyword = {k: v for k, v in settings.items() if "processor" not in k}
    theirs = Qwen2VLImageProcessorPil(**keyword)(random_image(height, width), return_tensors="pt")
    patches, grid = ours(random_image(height, width))
    assert list(grid) == theirs["image_grid_thw"][0].tolist()
    torch.testing.assert_close(patches, theirs["pixel_values"], atol=1e-5, rtol=0)
    assert ours.tokens(grid) == grid[1] * grid[2] // 4


def test_image_tokens_follow_each_images_size(qwen, batch) -> None:
    """Each conversation holds its own image's t * h * w / 4 image tokens, inside
    <|vision_start|> ... <|vision_end|>; the patches of both images are concatenated."""
    model, _, _, spec = qwen
    ids = model.token_ids
    patch = spec.settings["patch_size"]
    assert batch.image_grid.tolist() == spec.grids
    patches = sum(h * w for _, h, w in spec.grids)
    assert batch.clip_pixels.shape == (patches, 3 * 2 * patch * patch)
    counts = (batch.input_ids == ids.image).sum(dim=1).tolist()
    tokens = [h * w // 4 for _, h, w in spec.grids]
    assert counts == [tokens[0], tokens[0], tokens[1]]
    for row in batch.input_ids:
        start = int(torch.nonzero(row == ids.im_start)[0])
        end = int(torch.nonzero(row == ids.im_end)[0])
        assert (row[start + 1 : end] == ids.image).all()


def test_chatml_labels_cover_exactly_the_answer_and_its_end_of_turn(qwen, processor) -> None:
    model, tokenizer, _, spec = qwen
    processed = processor(sample(90, 130, CONVERSATIONS[:1]))
    ids, labels = processed.input_ids[0], processed.labels[0]
    answer = tokenizer.encode("Sure, [SEG] and [SEG].", add_special_tokens=False)
    labelled = labels[labels != -100].tolist()
    assert labelled == [*answer, model.token_ids.eos]
    text = tokenizer.decode(ids)
    assert text.startswith(f"{spec.system_turn}<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|im_start|>assistant\nSure, [SEG] and [SEG].<|im_end|>\n")
    template = template_for(tokenizer, spec.conv_type)
    tokens = int((ids == model.token_ids.image).sum())
    prompt = tokenize_prompt(
        [(CONVERSATIONS[0][0][0], None)], tokenizer, model.token_ids, tokens, template
    )
    first_label = int(torch.nonzero(labels != -100)[0])
    assert prompt.tolist() == ids[:first_label].tolist()


def reference_targets(model, batch, image: int, shift: int = 1, decode=None):
    """Independent composition: the family's own forward (its vision tower on this image's
    patches, its rotary positions) on each unpadded conversation of `image`, the hidden state
    `shift` positions before each [SEG], the projector, then `decode` (prompts [k, D] -> masks
    [k, H, W]; by default one SAM decoder call per prompt and SAM's post-processing by hand).
    Returns (prompts [k, D], masks [k, H, W], logits per conversation)."""
    if decode is None:
        embedding = model.sam.get_image_embeddings(batch.sam_pixels[image : image + 1])[0]
        decode = lambda prompts: torch.stack(  # noqa: E731
            [reference_mask(model, embedding, prompt, batch, image) for prompt in prompts]
        )
    ends = batch.image_grid.prod(dim=1).cumsum(0).tolist()
    start = 0 if image == 0 else ends[image - 1]
    pixels, grid = batch.clip_pixels[start : ends[image]], batch.image_grid[image : image + 1]
    prompts, logits = [], []
    for row in torch.nonzero(batch.conv_image == image).squeeze(1).tolist():
        ids = batch.input_ids[row][batch.attention_mask[row]][None]
        out = model.llava(
            input_ids=ids,
            pixel_values=pixels,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == model.token_ids.image).int(),
            output_hidden_states=True,
        )
        logits.append(out.logits[0])
        hidden = out.hidden_states[-1][0]
        for position in torch.nonzero(ids[0] == model.token_ids.seg).squeeze(1).tolist():
            prompts.append(model.text_hidden_fcs[0](hidden[position - shift]))
    prompts = torch.stack(prompts)
    return prompts, decode(prompts), logits


@torch.no_grad()
def test_masks_and_logits_equal_an_independent_composition(qwen, batch) -> None:
    """Fails if the rotary positions, the image features of the other image, or the position
    the projector reads were wrong; the control (the state AT [SEG]) differs."""
    model = qwen[0]
    model.eval()
    output = model(batch)
    for image in range(batch.num_images):
        rows = torch.nonzero(batch.conv_image == image).squeeze(1).tolist()
        seg = ~output.target_is_rej[image]
        prompts, masks, logits = reference_targets(model, batch, image)
        torch.testing.assert_close(
            output.prompt_embeddings[image][seg], prompts, atol=TOLERANCE, rtol=TOLERANCE
        )
        torch.testing.assert_close(
            output.pred_masks[image][seg], masks, atol=TOLERANCE, rtol=TOLERANCE
        )
        for row, theirs in zip(rows, logits, strict=True):
            ours = output.logits[row][batch.attention_mask[row]]
            torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=TOLERANCE)
        wrong, _, _ = reference_targets(model, batch, image, shift=0)
        assert (output.prompt_embeddings[image][seg] - wrong).abs().max() > 10 * TOLERANCE


def test_training_step_reaches_lora_the_decoder_and_the_new_rows(qwen, batch) -> None:
    """A training forward/backward: LoRA sits in the language model only, and the trainable
    parts (LoRA, embeddings, head, decoder, projector) receive gradients; the vision tower and
    its merger stay frozen."""
    model = qwen[0]
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    named = dict(model.named_parameters())
    lora = [name for name in named if ".lora_" in name]
    assert lora and all(name.startswith("llava.model.language_model.") for name in lora)
    for marker in ("lora_B", "embed_tokens", "lm_head", "mask_decoder", "text_hidden_fcs"):
        assert any(
            marker in name and p.grad is not None and p.grad.abs().sum() > 0
            for name, p in named.items()
        ), marker
    assert all(
        p.grad is None for name, p in named.items() if name.startswith("llava.model.visual.")
    )
    model.zero_grad(set_to_none=True)


def test_the_image_processors_pick_the_patch_transform(qwen) -> None:
    version = qwen[2]
    spec = qwen[3]
    processors = ImageProcessors.from_pretrained(version, 64)
    image = processors(random_image(90, 130))
    assert isinstance(processors.clip, PatchTransform)
    (_, height, width), patch = spec.grids[0], spec.settings["patch_size"]
    assert image.grid == (1, height, width) and image.tokens == height * width // 4
    assert image.vision.shape == (height * width, 3 * 2 * patch * patch)


@torch.no_grad()
def test_cached_generation_equals_rerunning_and_qwens_own_generate(qwen, batch) -> None:
    """Greedy answers of left-padded prompts of different lengths and images: the KV-cache
    path (multimodal positions continued past each row's largest) equals re-running the whole
    sequence each step and the family's own `generate` on each prompt alone."""
    model = qwen[0]
    model.eval()
    prompts = prompt_batch(batch)
    steps = 6
    cached = generate(model, prompts, max_new_tokens=steps, use_cache=True)
    rerun = generate(model, prompts, max_new_tokens=steps, use_cache=False)
    ends = prompts.image_grid.prod(dim=1).cumsum(0).tolist()
    for row, (first, second) in enumerate(zip(cached.sequences, rerun.sequences, strict=True)):
        assert torch.equal(first, second)
        image = int(prompts.conv_image[row])
        start = 0 if image == 0 else ends[image - 1]
        ids = prompts.input_ids[row][prompts.attention_mask[row]][None]
        theirs = model.llava.generate(
            input_ids=ids,
            pixel_values=prompts.clip_pixels[start : ends[image]],
            image_grid_thw=prompts.image_grid[image : image + 1],
            mm_token_type_ids=(ids == model.token_ids.image).int(),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=model.token_ids.eos,
            pad_token_id=model.token_ids.pad,
        )[0, ids.shape[1] :]
        assert first.tolist() == theirs.tolist()


@torch.no_grad()
def test_a_cached_step_sees_the_positions_qwen_gives_the_whole_sequence(qwen, batch) -> None:
    """After a left-padded, cached prefill, the next token's hidden state equals the family's
    forward over the whole sequence (its own multimodal positions); the control, the column
    index as position, differs."""
    model = qwen[0]
    model.eval()
    prompts = prompt_batch(batch)
    ids, mask, columns = left_pad(prompts.input_ids, prompts.attention_mask, model.token_ids.pad)
    grids = prompts.image_grid[prompts.conv_image]
    positions = prompt_positions(model.llava, ids, mask, columns, grids)
    features = per_conversation(
        image_features(model.llava, prompts.clip_pixels, prompts.image_grid), prompts.conv_image
    )
    _, cache = language_model_step(model.llava, ids, mask, features, positions, None, True)
    token = torch.full((len(ids), 1), 11)
    full_mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
    step = next_positions(positions)
    hidden, _ = language_model_step(
        model.llava, token, full_mask, None, step, copy.deepcopy(cache), True
    )
    control = torch.full_like(step, ids.shape[1])
    wrong, _ = language_model_step(model.llava, token, full_mask, None, control, cache, True)
    for row in range(len(ids)):
        sequence = torch.cat([ids[row][mask[row]], token[row]])[None]
        theirs = model.llava.model(
            input_ids=sequence,
            image_grid_thw=grids[row : row + 1],
            mm_encoder_outputs=encoder_outputs(model.llava, [features[row]]),
            mm_token_type_ids=(sequence == model.token_ids.image).int(),
        ).last_hidden_state[0, -1]
        torch.testing.assert_close(hidden[row, -1], theirs, atol=TOLERANCE, rtol=TOLERANCE)
        assert (wrong[row, -1] - theirs).abs().max() > 10 * TOLERANCE


@pytest.mark.parametrize("settings", [TINY_QWEN_IMAGE_SETTINGS, TINY_QWEN3_IMAGE_SETTINGS])
def test_the_pixel_budget_is_written_in_the_files_own_keys(settings) -> None:
    budget = with_pixel_budget(settings, None, 56 * 56 * 2)
    if "size" in settings:  # Qwen3-VL
        assert budget["size"] == {**settings["size"], "longest_edge": 56 * 56 * 2}
        assert "max_pixels" not in budget
    else:
        assert budget["max_pixels"] == 56 * 56 * 2 and "size" not in budget
    assert {k: v for k, v in budget.items() if k not in ("size", "max_pixels")} == {
        k: v for k, v in settings.items() if k not in ("size", "max_pixels")
    }
    transform = PatchTransform.from_settings(budget, Path("preprocessor_config.json"))
    factor = settings["patch_size"] * settings["merge_size"]
    assert transform.max_tokens == 56 * 56 * 2 // factor**2
    patches, grid = transform(random_image(300, 420))
    assert grid[1] * grid[2] * settings["patch_size"] ** 2 <= 56 * 56 * 2


def test_a_smaller_budget_gives_fewer_image_tokens_and_clip_refuses_one(qwen, tiny_dir) -> None:
    version = qwen[2]
    full = ImageProcessors.from_pretrained(version, 64)(random_image(300, 420))
    small = ImageProcessors.from_pretrained(version, 64, max_pixels=64 * 64)(random_image(300, 420))
    assert small.tokens < full.tokens and full.tokens == full.grid[1] * full.grid[2] // 4
    with pytest.raises(ValueError, match="Qwen-VL backbones"):
        ImageProcessors.from_pretrained(tiny_model_config(tiny_dir).version, 64, max_pixels=1)


def test_a_llava_template_on_a_qwen_backbone_is_refused(qwen) -> None:
    model, tokenizer, version, spec = qwen
    with pytest.raises(ValueError, match=f"use --conv_type {spec.conv_type}"):
        SampleProcessor.for_model(model, tokenizer, version, conv_type="llava_v1")


def test_a_recipes_llava_template_gives_way_to_the_backbones(qwen, tiny, caplog) -> None:
    """Not given on the command line, a recipe's LLaVA template on a Qwen backbone becomes the
    merged checkpoint's own or the family's, with a warning; given explicitly it stays (and
    `check_conv_type` stops the run); a fitting template always stays."""
    model, spec = qwen[0], qwen[3]
    assert backbone_conv_type(model, "llava_v1", explicit=False) == spec.conv_type
    assert "not llava_v1" in caplog.text
    assert backbone_conv_type(model, "llava_v1", False, saved="qwen3_vl") == "qwen3_vl"
    assert backbone_conv_type(model, "llava_v1", explicit=True) == "llava_v1"
    assert backbone_conv_type(model, spec.conv_type, explicit=False) == spec.conv_type
    llava = tiny[0]
    assert backbone_conv_type(llava, "llava_v1_cores", explicit=False) == "llava_v1_cores"
    assert backbone_conv_type(llava, "qwen2_vl", explicit=False) == "llava_v1"


def test_the_memory_plan_counts_the_budgets_image_tokens(qwen, tiny_dir, capsys) -> None:
    """--estimate_memory builds the family's model on meta; a smaller --max_pixels plans fewer
    image tokens, so less activation memory."""
    version = qwen[2]
    sam = tiny_model_config(tiny_dir).vision_pretrained
    flags = [f"--version={version}", f"--vision_pretrained={sam}", "--estimate_memory", "--json"]
    plans = []
    for budget in ([], ["--max_pixels=3136"]):
        main([*flags, *budget])
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[1]["activations_gb"] < plans[0]["activations_gb"]
    assert plans[1]["weights_gb"] == plans[0]["weights_gb"]


def test_train_mm_projector_trains_the_patch_mergers(qwen, tmp_path) -> None:
    """`--train_mm_projector` on Qwen-VL trains its patch merger (and Qwen3-VL's DeepStack
    mergers), the rest of the vision tower stays frozen."""
    spec = qwen[3]
    model, _ = build_tiny_segmenter(tmp_path, backbone=spec.family.name, train_mm_projector=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}
    mergers = ("llava.model.visual.merger.", "llava.model.visual.deepstack_merger_list.")
    assert trainable and all(name.startswith(mergers) for name in trainable)
    deepstack = any("deepstack" in name for name in trainable)
    assert deepstack is spec.family.deepstack


def test_a_padded_vocabulary_keeps_its_rows_and_new_tokens_take_spare_ones(tmp_path) -> None:
    """Qwen-VL's released embeddings have more rows than its tokenizer has tokens (152064 for
    151665): the segmentation tokens take the first spare rows, set to the mean of the
    tokenizer's rows; nothing is cut and the other rows are untouched."""
    tokenizer = build_tiny_qwen_tokenizer()
    config = qwen2_5_vl_config(tokenizer)
    spare = 32
    config.text_config.vocab_size = len(tokenizer) + spare
    torch.manual_seed(0)
    backbone = Qwen2_5_VLForConditionalGeneration(config)
    original = backbone.get_input_embeddings().weight.detach().clone()
    directory = tmp_path / "qwen2_5_vl_tiny"
    write_tiny_qwen_vl(directory, backbone, tokenizer, TINY_QWEN_IMAGE_SETTINGS)
    write_tiny_sam(tmp_path / "vision_pretrained" / "sam_tiny.pth")
    model, grown = build_segmenter(tiny_model_config(tmp_path, "qwen2_5_vl", new_token_rows="mean"))
    weights = model.llava.get_input_embeddings().weight.detach()
    assert weights.shape[0] == len(tokenizer) + spare and len(grown) == len(tokenizer) + 2
    ids = model.token_ids
    assert (ids.seg, ids.rej) == (len(tokenizer), len(tokenizer) + 1)
    mean = original[: len(tokenizer)].mean(dim=0)
    torch.testing.assert_close(weights[ids.seg], mean)
    torch.testing.assert_close(weights[ids.rej], mean)
    untouched = torch.ones(len(weights), dtype=torch.bool)
    untouched[[ids.seg, ids.rej]] = False
    assert torch.equal(weights[untouched], original[untouched])


@torch.no_grad()
def test_one_packed_row_equals_the_padded_pass_and_attends_within_conversations(qwen, batch):
    """All conversations in one row (flash-attention's layout) run through this model's sdpa
    attention: the packed multimodal positions [4, 1, W] give the padded pass's hidden states;
    the control, contiguous text positions (one causal sequence), changes them."""
    model = qwen[0]
    model.eval()
    ids, mask = batch.input_ids, batch.attention_mask
    grids = batch.image_grid[batch.conv_image]
    features = per_conversation(
        image_features(model.llava, batch.clip_pixels, batch.image_grid), batch.conv_image
    )
    padded, _ = language_model_step(model.llava, ids, mask, features, grids=grids)
    packed = pack(ids, mask, model.token_ids.pad, "flash_attention_2")
    assert packed.input_ids.shape[0] == 1
    positions = pack_rope_positions(rope_positions(model.llava, ids, mask, grids), packed)
    ordered = per_conversation(features, packed.order)
    real = mask.bool()
    for contiguous in (False, True):
        if contiguous:
            positions[0] = torch.arange(positions.shape[-1])
        hidden, _ = language_model_step(model.llava, packed.input_ids, None, ordered, positions)
        one_row = unpack(hidden, packed, *ids.shape)
        if contiguous:
            assert (one_row[real] - padded[real]).abs().max() > 10 * TOLERANCE
        else:
            torch.testing.assert_close(one_row[real], padded[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packing_gives_the_padded_losses_and_masks(qwen, batch) -> None:
    model = qwen[0]
    model.eval()
    outputs = []
    for packing in (False, True):
        model.packing = packing
        outputs.append(model(batch))
    model.packing = False
    padded, packed = outputs
    for name in ("ce_loss", "mask_bce_loss", "mask_dice_loss", "loss"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=0)
    for ours, theirs in zip(packed.pred_masks, padded.pred_masks, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# SAM2Transforms' defaults (sam2/utils/transforms.py): ImageNet mean and std on [0, 1] pixels
SAM2_MEAN, SAM2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", params=sorted(SPECS))
def qwen_sam2(request, tmp_path_factory):
    """A tiny Qwen-VL family + tiny SAM 2 segmenter, a batch of two images, their samples, and
    the official SAM 2 holding the same weights (read from the file our writer wrote)."""
    directory = tmp_path_factory.mktemp(f"{request.param}_sam2")
    model, tokenizer = build_tiny_segmenter(
        directory, seed=0, backbone=request.param, segmenter="sam2"
    )
    config = tiny_model_config(directory, request.param, "sam2")
    conv_type = SPECS[request.param].conv_type
    processor = SampleProcessor.for_model(model, tokenizer, config.version, conv_type=conv_type)
    samples = [
        sample(90, 130, CONVERSATIONS[:2], seed=0),
        sample(200, 60, CONVERSATIONS[2:], seed=1),
    ]
    batch = collate([processor(item) for item in samples], model.token_ids.pad)
    official = official_sam2(OFFICIAL_CONFIG.format("t"), TINY_OVERRIDES)
    state = torch.load(config.vision_pretrained, weights_only=True)["model"]
    loaded = official.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys
    assert loaded.missing_keys and all(is_tracking_key(key) for key in loaded.missing_keys)
    return model.eval(), batch, samples, official.eval()


def official_sam2_masks(official, image: np.ndarray, prompts: torch.Tensor) -> torch.Tensor:
    """The official SAM 2 path of SAM2ImagePredictor for one uint8 image and prompts [k, D] as
    sparse tokens: SAM2Transforms (to [0, 1], resize to S x S as torchvision's tensor Resize
    does, normalise), its features, its decoder, its post-processing -> logits [k, H, W]."""
    side = official.image_size
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float()[None] / 255
    pixels = F.interpolate(
        pixels, (side, side), mode="bilinear", align_corners=False, antialias=True
    )
    pixels = (pixels - torch.tensor(SAM2_MEAN)[:, None, None]) / torch.tensor(SAM2_STD)[
        :, None, None
    ]
    low, _ = official_decode(official, *official_features(official, pixels), prompts)
    return F.interpolate(low, image.shape[:2], mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def test_sam2_masks_equal_the_official_sam2_on_the_familys_own_states(qwen_sam2) -> None:
    """Qwen-VL + SAM 2: each [SEG] state (the family's own forward) through the projector
    prompts the official SAM 2 on the raw image; our masks equal its masks. The control (the
    state AT [SEG]) differs."""
    model, batch, samples, official = qwen_sam2
    output = model(batch)
    for image, item in enumerate(samples):
        seg = ~output.target_is_rej[image]

        def decode(prompts, item=item):
            return official_sam2_masks(official, item.image, prompts)

        prompts, masks, _ = reference_targets(model, batch, image, decode=decode)
        torch.testing.assert_close(
            output.prompt_embeddings[image][seg], prompts, atol=TOLERANCE, rtol=TOLERANCE
        )
        torch.testing.assert_close(
            output.pred_masks[image][seg], masks, atol=TOLERANCE, rtol=TOLERANCE
        )
        assert masks.shape[-2:] == item.image.shape[:2]
        _, wrong, _ = reference_targets(model, batch, image, shift=0, decode=decode)
        assert (output.pred_masks[image][seg] - wrong).abs().max() > 10 * TOLERANCE


def test_sam2_training_step_reaches_its_decoder_and_high_resolution_convolutions(
    qwen_sam2,
) -> None:
    """SAM 2's decoder trains, its conv_s0/conv_s1 included (they run after the frozen
    encoder, with gradients); the Hiera trunk and neck stay frozen."""
    model, batch, _, _ = qwen_sam2
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    decoder = model.sam.mask_decoder
    for parameter in (decoder.conv_s0.weight, decoder.conv_s1.weight, decoder.iou_token.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.sam.vision_encoder.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()
