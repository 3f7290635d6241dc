"""Tiny random-weight models for tests and the demo, built through the same code paths as the
real sizes: a LLaMA-style BPE tokenizer trained locally on the shapes-world vocabulary, a tiny
`LlavaForConditionalGeneration` saved as a Hugging Face directory, a tiny SAM saved in the
original segment-anything layout, and `build_tiny_segmenter`, which loads both with
`build_segmenter` exactly as a real run loads LLaVA-7B and ViT-H.

Qwen2.5-VL (`write_tiny_qwen2_5_vl`) is written as its Hugging Face directories are: a
byte-level BPE tokenizer (trained locally on the same corpus) with Qwen's special tokens in
their order and `<|im_end|>` as EOS, a `Qwen2_5_VLForConditionalGeneration` with multimodal
rotary sections, and Qwen2-VL's image-processor settings (pixel budget, 14-pixel patches, 2 x 2
merge).

The LLaMA tokenizer is one tokenizer in both of LLaMA's files: the `sentencepiece` trainer
writes the `tokenizer.model` (BPE, byte fallback, LLaMA's trainer settings and special ids
unk=0, <s>=1, </s>=2), and transformers' own sentencepiece converter derives the
`tokenizer.json` from it, so a legacy reader of `tokenizer.model` and a reader of
`tokenizer.json` get the same ids.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, replace
from functools import cache
from itertools import product
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import SentencePieceExtractor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from model.builder import ModelConfig, build_segmenter
from model.sam import (
    SAM_PRESETS,
    build_sam,
    sam_config,
    sam_config_from_preset,
    save_sam_checkpoint,
)
from model.sam2 import build_sam2, sam2_config_from_preset, save_sam2_checkpoint
from model.tokens import IMAGE_TOKEN, QWEN_VL_IMAGE_TOKENS

RESET_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)

TINY_VOCAB_SIZE = 1000
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # the name LLaMA / LLaVA-v1 directories give it
# LLaMA's sentencepiece trainer settings (its tokenizer.model's trainer_spec), at our size;
# one thread keeps the trained model byte-for-byte the same on every run.
SENTENCEPIECE_TRAINER = dict(
    model_type="bpe",
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    num_threads=1,
    minloglevel=2,
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
# The demo's CLIP: it sees the whole 64-pixel image as 16 tokens of 16 x 16 pixels, four times
# as wide as the tests' one, with four layers, so that the layer LLaVA reads (the second to last)
# has mixed the tokens three times (docs/DEMO.md, attempt AA: width 64 and 3 layers bound colour
# to shape too weakly for the chat's near misses).
DEMO_VISION = dict(
    TINY_VISION,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=64,
    patch_size=16,
)
# The demo's SAM (`make demo`, docs/DEMO.md): the tiny one twice as wide, so the decoder's
# upscaled mask features have 8 channels instead of 4, and with 4-pixel patches, so the frozen
# encoder sees each shape as several tokens (a 16 x 16 grid instead of 8 x 8).
DEMO_SAM = dict(
    SAM_PRESETS["tiny"],
    hidden_size=64,
    num_attention_heads=4,
    patch_size=4,
    window_size=8,
    prompt_dim=64,
    decoder_mlp_dim=128,
    decoder_heads=4,
    iou_head_hidden_dim=64,
)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of the tiny models written together: LLaMA and CLIP dims, and SAM dims (None:
    the "tiny" SAM preset)."""

    text: dict
    vision: dict
    sam: dict | None = None


MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(TINY_TEXT, TINY_VISION),
    "demo": ModelPreset(TINY_TEXT, DEMO_VISION, DEMO_SAM),
}
# the shapes of the 7B models the papers used (benchmarks build random ones of this size)
LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
CLIP_L14_224 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
)

# the benchmarks' "small" CPU preset: the LLM's matrix products dominate a step
SMALL_TEXT = dict(
    hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16
)
# 64 px / 4 px patches = 256 image tokens, as CLIP ViT-L/14 at 224 px gives
SMALL_VISION = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=4,
)
SMALL_VOCAB = 32000  # LLaMA's vocabulary: a real head and softmax

# Qwen2.5-VL's tokenizer: its special tokens in their order after the vocabulary, its EOS
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_EOS = "<|im_end|>"
TINY_QWEN_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
)
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
# Qwen2.5-VL's preprocessor_config.json with a tiny pixel budget: 4 to 16 image tokens
TINY_QWEN_IMAGE_SETTINGS = {
    "min_pixels": 56 * 56,
    "max_pixels": 112 * 112,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

TINY_QWEN3_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=16,  # a 4 x 4 grid of learned positions, interpolated per image
    deepstack_visual_indexes=[0],
)
# Qwen3-VL's preprocessor_config.json (pixel budget as `size`, mean/std 0.5), tiny budget
TINY_QWEN3_IMAGE_SETTINGS = {
    "size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
}

COLOURS = (
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray"
)  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "house", "car", "tree", "ring", "shape", "object")
PARTS = ("roof", "wall", "door", "window", "wheel", "body", "trunk", "leaves", "part", "center")
SENTENCES = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language.",
    "USER: ASSISTANT: [INST] <<SYS>> <</SYS>> [/INST]",
    "Can you segment the {x} in this image?",
    "Please segment the {x} in this image.",
    "What is {x} in this image? Please respond with segmentation mask.",
    "What are {x} in this image? Please output segmentation masks.",
    "Could you identify the {x} in this picture? Provide the segmentation mask.",
    "Please output segmentation mask and explain why. It is the {x} on the left of the picture.",
    "Sure, it is the {x}. Sure, the segmentation result is the {x}. The {x} is not present.",
    "Which object would someone use to find the {x}? The part of the {x} at the top right.",
    "The segmentation results are the {x}, and the mask of the {x}, separately.",
    "How many {x} are there, where, what color, which one is bigger, smaller, near, behind?",
    "How many {x} objects are there in the image? There are three {x} objects: a {x}.",
    "Is there a {x} in the image? Yes, there is a {x} on the left side of the image.",
    "No, there is no {x}. What colour is the {x}? Which object is leftmost? It is the {x}.",
)


def tokenizer_corpus() -> list[str]:
    """Sentences covering the templates and the shapes-world names (deterministic)."""
    names = [f"{c} {s}" for c, s in product(COLOURS, SHAPES)]
    names += [f"{p} of the {s}" for p, s in product(PARTS, SHAPES)]
    return [sentence.replace("{x}", name) for name in names for sentence in SENTENCES]


@cache
def tiny_sentencepiece_model(vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """The serialized sentencepiece `ModelProto` (the bytes of `tokenizer.model`) trained on
    `tokenizer_corpus()` with LLaMA's settings (`SENTENCEPIECE_TRAINER`); the same bytes on
    every call and run."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        **SENTENCEPIECE_TRAINER,
    )
    return model.getvalue()


def write_sentencepiece_model(directory: str | Path, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Write the tiny `tokenizer.model` into `directory`. Returns its path."""
    path = Path(directory) / SENTENCEPIECE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_sentencepiece_model(vocab_size))
    return path


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> LlamaTokenizer:
    """A LLaMA tokenizer (BPE, `▁` word marker, byte fallback, `<s>` prepended, unk = 0): the
    tiny sentencepiece model (`tiny_sentencepiece_model`) converted by transformers'
    `SentencePieceExtractor`, as `from_pretrained` converts a LLaMA `tokenizer.model`, with
    `<image>` added as a special token."""
    with tempfile.TemporaryDirectory() as directory:
        extracted = SentencePieceExtractor(str(write_sentencepiece_model(directory, vocab_size)))
        converted = extracted.extract(BPE)
    tokenizer = LlamaTokenizer(
        vocab=converted["vocab"], merges=converted["merges"], add_bos_token=True
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.init_kwargs["legacy"] = False  # saved: a reader of tokenizer.model splits alike
    return tokenizer


def save_tiny_tokenizer(tokenizer: LlamaTokenizer, directory: str | Path) -> None:
    """Save the tokenizer as a LLaVA-v1 directory holds it: `tokenizer.json`, `tokenizer.model`
    and a `tokenizer_config.json` that says to prepend `<s>` (transformers 5 leaves that flag
    out, as tokenizer.json carries it; a reader of tokenizer.model alone needs it)."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    write_sentencepiece_model(directory, tokenizer.vocab_size)
    config_path = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def llava_config(
    tokenizer: LlamaTokenizer, text: dict = TINY_TEXT, vision: dict = TINY_VISION
) -> LlavaConfig:
    """LLaVA config with the given LLaMA and CLIP dimensions (default: the tiny model, CLIP
    32 px / patch 8 = 16 image tokens, LLaMA width 64); benchmarks pass 7B-shaped ones."""
    text_config = LlamaConfig(
        **text,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.unk_token_id,
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def write_tiny_llava(
    directory: str | Path, seed: int = 0, text: dict = TINY_TEXT, vision: dict = TINY_VISION
) -> Path:
    """Write a random-weight LLaVA (tiny unless other dimensions are given) as a Hugging Face
    directory (weights, config, tokenizer as `tokenizer.json` and `tokenizer.model`, CLIP
    image-processor settings). Returns it."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(tokenizer, text, vision))
    model.save_pretrained(directory)
    save_tiny_tokenizer(tokenizer, directory)
    write_clip_image_settings(directory, vision["image_size"])
    return directory


def build_tiny_qwen_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer (byte-level BPE trained on `tokenizer_corpus()`, no BOS) with Qwen's
    special tokens after the vocabulary in Qwen2.5-VL's order (`QWEN_SPECIAL_TOKENS`), pad
    `<|endoftext|>` and EOS `<|im_end|>`, as the Instruct models' tokenizers have them."""
    trained = Tokenizer(BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.eos_token = QWEN_EOS
    return tokenizer


def qwen_vl_text(tokenizer: Qwen2Tokenizer, **settings) -> dict:
    """The tiny Qwen-VL language model's config values (TINY_TEXT, grouped-query attention with
    half the heads, the tokenizer's vocabulary and pad id) plus a family's `settings`."""
    heads = TINY_TEXT["num_attention_heads"]
    return dict(
        TINY_TEXT,
        num_key_value_heads=heads // 2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


def qwen_vl_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """The config's image, video and vision start/end ids, read from `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids(QWEN_VL_IMAGE_TOKENS.image),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids(QWEN_VL_IMAGE_TOKENS.start),
        vision_end_token_id=ids(QWEN_VL_IMAGE_TOKENS.end),
    )


def qwen2_5_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config of the tiny model (width 64, a 2-layer ViT of 14-pixel patches whose
    2 x 2 merge writes one token per 28 x 28 pixels), the special ids read from `tokenizer`."""
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    text = qwen_vl_text(
        tokenizer,
        rope_parameters=rope,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = TINY_QWEN_VISION | {"out_hidden_size": TINY_TEXT["hidden_size"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen_vl_token_ids(tokenizer))


def qwen3_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """Qwen3-VL config of the tiny model (width 64, a 2-layer ViT of 16-pixel patches whose
    first layer also feeds DeepStack features to the first language layer; interleaved
    multimodal rotary sections), the special ids read from `tokenizer`."""
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3]}
    text = qwen_vl_text(
        tokenizer,
        head_dim=TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"],
        rope_parameters=rope | {"mrope_interleaved": True},
    )
    vision = TINY_QWEN3_VISION | {"out_hidden_size": TINY_TEXT["hidden_size"]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **qwen_vl_token_ids(tokenizer))


def write_tiny_qwen_vl(
    directory: str | Path, model: nn.Module, tokenizer: Qwen2Tokenizer, image_settings: dict
) -> Path:
    """Save a tiny Qwen-VL as its Hugging Face directories hold it (config.json,
    model.safetensors, tokenizer.json + tokenizer_config.json, preprocessor_config.json)."""
    directory = Path(directory)
    reset_to_torch_defaults(model.model.visual)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / PREPROCESSOR_CONFIG_FILE).write_text(
        json.dumps(image_settings, indent=2) + "\n", encoding="utf-8"
    )
    return directory


def write_tiny_qwen2_5_vl(directory: str | Path, seed: int = 0) -> Path:
    """Write a random-weight tiny Qwen2.5-VL as a Hugging Face directory (`write_tiny_qwen_vl`,
    image settings in Qwen2.5-VL's keys). Returns it."""
    tokenizer = build_tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer))
    return write_tiny_qwen_vl(directory, model, tokenizer, TINY_QWEN_IMAGE_SETTINGS)


def write_tiny_qwen3_vl(directory: str | Path, seed: int = 0) -> Path:
    """Write a random-weight tiny Qwen3-VL as a Hugging Face directory (`write_tiny_qwen_vl`,
    image settings in Qwen3-VL's keys). Returns it."""
    tokenizer = build_tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(qwen3_vl_config(tokenizer))
    return write_tiny_qwen_vl(directory, model, tokenizer, TINY_QWEN3_IMAGE_SETTINGS)


def write_clip_image_settings(directory: str | Path, size: int) -> None:
    """`preprocessor_config.json` of a CLIP tower with `size`-pixel inputs (CLIP's mean/std,
    shortest side resized to `size`, centre crop)."""
    CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(directory)


def reset_to_torch_defaults(model: nn.Module) -> None:
    """Re-initialise Linear/Conv/Embedding layers with PyTorch's scale-preserving defaults.

    transformers' SAM init (normal, std 0.02) shrinks activations layer after layer: a random
    tiny SAM then predicts mask logits of ~1e-5, which no test can tell apart and the demo
    learns slowly from. A pretrained SAM has O(1) outputs; this init gives the same.
    """
    for module in model.modules():
        if isinstance(module, RESET_LAYER_TYPES):
            module.reset_parameters()


def write_tiny_sam(
    path: str | Path, seed: int = 0, preset: str = "tiny", dims: dict | None = None
) -> Path:
    """Write a random-weight SAM (the tiny 64 px one unless another preset, e.g. "vit_h", is
    named, or `dims` gives every `sam_config` dimension, e.g. DEMO_SAM) in the original
    checkpoint layout."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sam = build_sam(sam_config(**dims) if dims else sam_config_from_preset(preset))
    reset_to_torch_defaults(sam)
    save_sam_checkpoint(sam, path)
    return path


def write_tiny_sam2(path: str | Path, seed: int = 0) -> Path:
    """Write the random-weight tiny SAM 2 (128 px, `model.sam2.SAM2_SIZES["tiny"]`) in the
    original layout of the released `sam2.1_hiera_*.pt` files."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sam2 = build_sam2(sam2_config_from_preset("tiny"))
    reset_to_torch_defaults(sam2)
    save_sam2_checkpoint(sam2, path)
    return path


# the tiny mask models by kind (`model.mask_models.MASK_MODELS`): file name under
# `vision_pretrained/` and writer (path, seed) -> path
TINY_SEGMENTERS = {
    "sam": ("sam_tiny.pth", write_tiny_sam),
    "sam2": ("sam2_tiny.pt", write_tiny_sam2),
}


def tiny_model_config(
    directory: str | Path, backbone: str = "llava", segmenter: str = "sam", **overrides
) -> ModelConfig:
    """ModelConfig for the tiny assets under `directory` (fp32, small LoRA, tiny SAM width), with
    the tiny `backbone` (`TINY_BACKBONES`) at `directory/<backbone>_tiny` and the tiny
    `segmenter` (`TINY_SEGMENTERS`) under `directory/vision_pretrained/`."""
    directory = Path(directory)
    if backbone not in TINY_BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(TINY_BACKBONES)}, not {backbone!r}")
    if segmenter not in TINY_SEGMENTERS:
        raise ValueError(f"segmenter must be one of {sorted(TINY_SEGMENTERS)}, not {segmenter!r}")
    prompt_dim = sam_config_from_preset("tiny").mask_decoder_config.hidden_size
    config = ModelConfig(
        version=str(directory / f"{backbone}_tiny"),
        vision_pretrained=str(directory / "vision_pretrained" / TINY_SEGMENTERS[segmenter][0]),
        precision="fp32",
        gradient_checkpointing=False,
        out_dim=prompt_dim,
        lora_r=4,
    )
    return replace(config, **overrides)


# the tiny backbones by family name: their writers (directory, seed) -> directory
TINY_BACKBONES = {
    "llava": write_tiny_llava,
    "qwen2_5_vl": write_tiny_qwen2_5_vl,
    "qwen3_vl": write_tiny_qwen3_vl,
}


def build_tiny_segmenter(
    directory: str | Path,
    seed: int = 0,
    backbone: str = "llava",
    segmenter: str = "sam",
    **overrides,
):
    """Write the tiny `backbone` (LLaVA unless named) and `segmenter` (SAM unless named) under
    `directory` (if absent) and build the segmenter from them with `build_segmenter`.
    Returns (Segmenter, tokenizer)."""
    config = tiny_model_config(directory, backbone, segmenter, **overrides)
    if not Path(config.version).is_dir():
        TINY_BACKBONES[backbone](config.version, seed)
    if not Path(config.vision_pretrained).is_file():
        TINY_SEGMENTERS[segmenter][1](config.vision_pretrained, seed)
    torch.manual_seed(seed)
    return build_segmenter(config)
