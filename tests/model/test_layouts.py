"""Published checkpoint layouts (REFERENCE.md 3): LLaVA-v1 bases, merged LISA / M2SA directories
and GSVA / LISA training-time state dicts, written tiny in their real layouts (file names, key
names, config fields, dtypes, a SentencePiece `tokenizer.model` with transformers-4.31-era
tokenizer files), loaded through `build_segmenter` / `load_weights` and compared with an
independent composition of the same raw tensors: transformers' LlamaForCausalLM and
CLIPVisionModel, a plain Linear for `mm_projector`, a plain MLP for `text_hidden_fcs`, M2SA's
`compress_vit` written out, and the official segment-anything decoder as LISA calls it. Their
weight files go through the one safe reader (a file holding code is refused, and nothing runs),
and the layout is detected once per load.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from model import layouts
from model.backbone import image_token_count
from model.builder import ModelConfig, build_segmenter
from model.layouts import Layout, detect_layout, image_settings_directory
from model.tensor_files import UnsafeCheckpointError
from model.tiny import (
    TINY_TEXT,
    TINY_VISION,
    tokenizer_corpus,
    write_clip_image_settings,
    write_tiny_sam,
)
from tests.helpers import Conversation, make_batch
from tests.model.test_sam import official_sam, randomise_
from tests.utils.unsafe_checkpoints import write_unsafe_file
from utils.collate import template_for, tokenize_conversation, tokenize_prompt
from utils.inference import Segmentation
from utils.weights import load_weights

TOL = {"atol": 1e-5, "rtol": 1e-5}
STD = 0.2  # random weights large enough that every compared value is far from zero
SP_VOCAB = 500  # the tiny LLaMA vocabulary (32000 in the real ones)
LISA_TOKENS = ("[SEG]", "<im_start>", "<im_end>")
GSVA_TOKENS = ("[SEG]", "[REJ]", "<im_start>", "<im_end>")
# CoReS train_ds_best.py: add_tokens("[SEG_SEMA]"), add_tokens("[SEG]"), then the image wrapping
CORES_TOKENS = ("[SEG_SEMA]", "[SEG]", "<im_start>", "<im_end>")
# LaSagnA train_ds.py:142-160: its three special tokens, <ins>, <no_ins>, the image wrapping
LASAGNA_TOKENS = (
    "<cat_start>",
    "<cat_end>",
    "<semantic>",
    "<ins>",
    "<no_ins>",
    "<im_start>",
    "<im_end>",
)
ARCHITECTURES = {
    LISA_TOKENS: "LISAForCausalLM",
    CORES_TOKENS: "CORESForCausalLM",
    LASAGNA_TOKENS: "LaSagnAForCausalLM",
}
CORES_ANSWER = "It usually appears on [SEG_SEMA]. It is [SEG]."  # CoReS's validation answer
PROMPT_DIM = 32  # the tiny SAM's prompt width (256 in the real ones)
FIRST_GLOBAL_BLOCK = 1  # of the tiny SAM; M2SA fuses ViT-H's block 7
LORA_R, LORA_ALPHA = 4, 16
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_SIZES = [(40, 56), (64, 48)]
CONVERSATIONS = [
    Conversation(0, "Can you segment the red circle in this image?", "It is [SEG]."),
    Conversation(0, "What are the blue square and the green star?", "Sure, [SEG] and [SEG]."),
    Conversation(1, "Please segment the yellow car.", "[SEG]."),
]
SAM_PREFIX = "model.visual_model."
CLIP_KEY_PREFIX = "model.vision_tower.vision_tower.vision_model."
PEFT = "base_model.model."
VISION = "vision_model."
LORA_TARGET = re.compile(r"model\.layers\.\d+\.self_attn\.[qv]_proj\.weight")
ADDED_TOKEN = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False}


# --- writing the legacy layouts -------------------------------------------------------------


def train_sentencepiece() -> bytes:
    """A LLaMA-style SentencePiece BPE model (byte fallback, dummy prefix, whitespace kept)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(directory: Path, sp_model: bytes, added: tuple[str, ...]) -> None:
    """tokenizer.model + the json files transformers 4.28-4.31 wrote (added_tokens.json)."""
    (directory / "tokenizer.model").write_bytes(sp_model)
    special = {
        name: {**ADDED_TOKEN, "content": text, "single_word": False}
        for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": None,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {**special, "pad_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    if added:
        ids = {token: SP_VOCAB + index for index, token in enumerate(added)}
        (directory / "added_tokens.json").write_text(json.dumps(ids))


def random_tensors(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """N(0, STD) everywhere, norm scales around 1 (activations keep their size)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {key: torch.randn(v.shape, generator=generator) * STD for key, v in state.items()}
    for key in tensors:
        if "norm" in key and key.endswith("weight"):
            tensors[key] += 1.0
    return tensors


def llama_tensors(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """LLaMA weights under their (legacy = LlamaForCausalLM) names."""
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config(vocab))
    return random_tensors(llama.state_dict(), seed)


def llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(**TINY_TEXT, vocab_size=vocab, rms_norm_eps=1e-6, tie_word_embeddings=False)


def legacy_config(vocab: int, dtype: str) -> dict:
    """config.json of a LLaVA-v1 base as LLaVA wrote it (transformers 4.28)."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **TINY_TEXT,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "image_aspect_ratio": "square",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "transformers_version": "4.28.0.dev0",
    }


def save_sharded(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """pytorch_model-0000i-of-0000n.bin files plus pytorch_model.bin.index.json."""
    keys = list(tensors)
    size = -(-len(keys) // shards)
    weight_map = {}
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        chunk = keys[index * size : (index + 1) * size]
        torch.save({key: tensors[key] for key in chunk}, directory / name)
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index_file, indent=2))


@dataclass
class Legacy:
    """A written legacy directory and the tensors in it (as stored)."""

    directory: Path
    tensors: dict[str, torch.Tensor]
    added: tuple[str, ...]


def write_llava_v1(directory: Path, sp_model: bytes, seed: int = 0) -> Legacy:
    """A LLaVA-v1 base: fp16 LLaMA + mm_projector + the rotary buffers 4.28 saved."""
    directory.mkdir(parents=True)
    width, clip_width = TINY_TEXT["hidden_size"], TINY_VISION["hidden_size"]
    tensors = llama_tensors(SP_VOCAB, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tensors["model.mm_projector.weight"] = torch.randn(width, clip_width, generator=generator) * STD
    tensors["model.mm_projector.bias"] = torch.randn(width, generator=generator) * STD
    head_dim = width // TINY_TEXT["num_attention_heads"]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for layer in range(TINY_TEXT["num_hidden_layers"]):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    stored = {k: v.half() if "inv_freq" not in k else v for k, v in tensors.items()}
    save_sharded(directory, stored)
    (directory / "config.json").write_text(json.dumps(legacy_config(SP_VOCAB, "float16")))
    write_tokenizer(directory, sp_model, ())
    return Legacy(directory, stored, ())


def segmentation_tensors(seed: int, fusion: bool) -> dict[str, torch.Tensor]:
    """SAM (official names), text_hidden_fcs and, for M2SA, compress_vit."""
    sam = randomise_(official_sam(), seed).state_dict()
    tensors = {SAM_PREFIX + key: value for key, value in sam.items()}
    width, vit = TINY_TEXT["hidden_size"], TINY_VISION["hidden_size"]
    shapes = {
        "model.text_hidden_fcs.0.0.weight": (width, width),
        "model.text_hidden_fcs.0.0.bias": (width,),
        "model.text_hidden_fcs.0.2.weight": (PROMPT_DIM, width),
        "model.text_hidden_fcs.0.2.bias": (PROMPT_DIM,),
    }
    if fusion:
        compress = SAM_PREFIX + "mask_decoder.compress_vit."
        shapes |= {
            compress + "0.weight": (PROMPT_DIM, vit, 3, 3),
            compress + "0.bias": (PROMPT_DIM,),
            compress + "1.weight": (PROMPT_DIM,),
            compress + "1.bias": (PROMPT_DIM,),
            compress + "3.weight": (PROMPT_DIM, PROMPT_DIM, 3, 3),
            compress + "3.bias": (PROMPT_DIM,),
        }
    tensors |= random_tensors({k: torch.empty(s) for k, s in shapes.items()}, seed + 1)
    return tensors


def write_lisa(
    directory: Path,
    sp_model: bytes,
    fusion: bool = False,
    seed: int = 2,
    added: tuple[str, ...] = LISA_TOKENS,
) -> Legacy:
    """A merged LISA (with fusion, M2SA; with CORES_TOKENS, CoReS; with LASAGNA_TOKENS, LaSagnA)
    directory: bf16, LLM + SAM + projector, the family's added tokens in its id order."""
    directory.mkdir(parents=True)
    vocab = SP_VOCAB + len(added)
    width, clip_width = TINY_TEXT["hidden_size"], TINY_VISION["hidden_size"]
    tensors = llama_tensors(vocab, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tensors["model.mm_projector.weight"] = torch.randn(width, clip_width, generator=generator) * STD
    tensors["model.mm_projector.bias"] = torch.randn(width, generator=generator) * STD
    tensors |= segmentation_tensors(seed + 2, fusion)
    stored = {key: value.bfloat16() for key, value in tensors.items()}
    save_sharded(directory, stored)
    config = legacy_config(vocab, "bfloat16") | {
        "architectures": [ARCHITECTURES[added] if not fusion else "M2SAForCausalLM"],
        "train_mask_decoder": True,
        "out_dim": PROMPT_DIM,
        "vision_tower": "openai/clip-vit-large-patch14",
        "mm_use_im_start_end": True,
        "use_cache": False,
        "transformers_version": "4.31.0",
    }
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory, sp_model, added)
    return Legacy(directory, stored, added)


def write_clip(directory: Path, seed: int = 3) -> Path:
    """A CLIPModel directory (text + vision, as openai/clip-vit-large-patch14) with its
    preprocessor_config.json."""
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=8)
    model = CLIPModel(config)
    model.load_state_dict(random_tensors(model.state_dict(), seed))
    model.save_pretrained(directory)
    write_clip_image_settings(directory, TINY_VISION["image_size"])
    return directory


def write_training_state_dict(
    path: Path, added: tuple[str, ...], naming: str, lora_r: int = LORA_R, seed: int = 6
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A LISA/GSVA training-time state dict as `zero_to_fp32.py` wrote it (fp32, PEFT prefix,
    LoRA on q/v in PEFT 0.4 ("old": base at `q_proj.weight`) or newer naming, CLIP included).
    Returns (the weights without the prefix and LoRA, {LoRA module: (A [r, H], B [H, r])})."""
    width, clip_width = TINY_TEXT["hidden_size"], TINY_VISION["hidden_size"]
    tensors = llama_tensors(SP_VOCAB + len(added), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tensors["model.mm_projector.weight"] = torch.randn(width, clip_width, generator=generator) * STD
    tensors["model.mm_projector.bias"] = torch.randn(width, generator=generator) * STD
    tensors |= segmentation_tensors(seed + 2, fusion=False)
    clip = clip_model_tensors(seed + 3)
    tensors |= {CLIP_KEY_PREFIX + key: value for key, value in clip.items()}
    stored, lora = {PEFT + key: value for key, value in tensors.items()}, {}
    for key in [key for key in tensors if LORA_TARGET.fullmatch(key)]:
        module = key.removesuffix(".weight")
        lora_a = torch.randn(lora_r, width, generator=generator) * STD
        lora_b = torch.randn(width, lora_r, generator=generator) * STD
        if naming == "new":
            stored[f"{PEFT}{module}.base_layer.weight"] = stored.pop(PEFT + key)
        stored[f"{PEFT}{module}.lora_A.default.weight"] = lora_a
        stored[f"{PEFT}{module}.lora_B.default.weight"] = lora_b
        lora[module] = (lora_a, lora_b)
    torch.save(stored, path)
    return tensors, lora


def clip_model_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Random CLIP vision weights under CLIPVisionModel's names."""
    with torch.device("meta"):
        state = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).state_dict()
    return random_tensors(state, seed)


@dataclass
class Assets:
    root: Path
    sp_model: bytes
    clip: Path
    sam: Path
    llava_v1: Legacy
    lisa: Legacy
    m2sa: Legacy
    cores: Legacy
    lasagna: Legacy


@pytest.fixture(scope="session")
def legacy_assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("legacy")
    sp_model = train_sentencepiece()
    return Assets(
        root=root,
        sp_model=sp_model,
        clip=write_clip(root / "clip-vit-large-patch14"),
        sam=write_tiny_sam(root / "sam_tiny.pth"),
        llava_v1=write_llava_v1(root / "LLaVA-Lightning-7B-v1-1", sp_model),
        lisa=write_lisa(root / "LISA-7B-v1", sp_model),
        m2sa=write_lisa(root / "M2SA-7B", sp_model, fusion=True, seed=4),
        cores=write_lisa(root / "CoReS-7B", sp_model, seed=8, added=CORES_TOKENS),
        lasagna=write_lisa(root / "LaSagnA-7B", sp_model, seed=10, added=LASAGNA_TOKENS),
    )


def model_config(assets: Assets, version: Path, **overrides) -> ModelConfig:
    config = ModelConfig(
        version=str(version),
        vision_pretrained=str(assets.sam),
        vision_tower=str(assets.clip),
        precision="fp32",
        gradient_checkpointing=False,
        out_dim=PROMPT_DIM,
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
    )
    return replace(config, **overrides)


def build(assets: Assets, version: Path, **overrides):
    model, tokenizer = build_segmenter(model_config(assets, version, **overrides))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def llava_v1_model(legacy_assets):
    return build(legacy_assets, legacy_assets.llava_v1.directory)


@pytest.fixture(scope="module")
def lisa_model(legacy_assets):
    return build(legacy_assets, legacy_assets.lisa.directory, vision_pretrained="")


@pytest.fixture(scope="module")
def m2sa_model(legacy_assets):
    return build(legacy_assets, legacy_assets.m2sa.directory, vision_pretrained="")


@pytest.fixture(scope="module")
def cores_model(legacy_assets):
    return build(legacy_assets, legacy_assets.cores.directory, vision_pretrained="")


@pytest.fixture(scope="module")
def lasagna_model(legacy_assets):
    return build(legacy_assets, legacy_assets.lasagna.directory, vision_pretrained="")


# --- the independent composition ---------------------------------------------------------


@dataclass
class Reference:
    """Outputs computed from raw tensors: logits [C, L, V_ckpt] (checkpoint ids), per image
    [SEG] embeddings [k, D] and masks [k, H, W]."""

    logits: torch.Tensor
    prompts: list[torch.Tensor]
    masks: list[torch.Tensor]


def checkpoint_rows(tokenizer, added: tuple[str, ...]) -> torch.Tensor:
    """For each of our ids, the checkpoint row of the same token; tokens the checkpoint lacks
    point one past its last row, where the reference puts the mean row (our new-row init)."""
    rows = torch.full((len(tokenizer),), SP_VOCAB + len(added), dtype=torch.long)
    rows[:SP_VOCAB] = torch.arange(SP_VOCAB)
    for offset, token in enumerate(added):
        rows[tokenizer.convert_tokens_to_ids(token)] = SP_VOCAB + offset
    return rows


def clip_model(assets: Assets, tensors: dict[str, torch.Tensor] | None = None):
    """CLIPVisionModel holding `tensors`, by default the vision half of the CLIP directory."""
    if tensors is None:
        stored = load_file(assets.clip / "model.safetensors")
        tensors = {k.removeprefix(VISION): v for k, v in stored.items() if k.startswith(VISION)}
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    clip.load_state_dict(tensors, strict=True)
    return clip.eval()


class LoraLinear(nn.Module):
    """W x + alpha/r B A x, written out."""

    def __init__(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.lora_a, self.lora_b = weight, lora_a, lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = LORA_ALPHA / self.lora_a.shape[0]
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * scale


def reference_llm(llama_state, projector, clip, batch, image_id, rows, lora) -> tuple:
    """Embedding lookup, CLIP penultimate layer without CLS, one Linear, LLaMA (+ LoRA)."""
    llama = LlamaForCausalLM(llama_config(llama_state["model.embed_tokens.weight"].shape[0]))
    llama.load_state_dict(llama_state, strict=True)
    for module, (lora_a, lora_b) in lora.items():
        parent, _, name = module.rpartition(".")
        weight = llama.get_submodule(module).weight
        setattr(llama.get_submodule(parent), name, LoraLinear(weight, lora_a, lora_b))
    llama.eval()
    hidden_states = clip(batch.clip_pixels, output_hidden_states=True).hidden_states
    features = F.linear(hidden_states[-2][:, 1:], *projector)  # [N, T, H]
    table = llama.get_input_embeddings().weight
    embeds = torch.cat([table, table.mean(0, keepdim=True)])[rows[batch.input_ids]]
    for conv, image in enumerate(batch.conv_image.tolist()):
        embeds[conv, batch.input_ids[conv] == image_id] = features[image]
    out = llama(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, output_hidden_states=True
    )
    return out.logits, out.hidden_states[-1]


def compress_vit(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """M2SA's Conv3x3 -> LayerNorm2d -> GELU -> Conv3x3, written out."""
    x = F.conv2d(x, t["0.weight"], t["0.bias"], padding=1)
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-6)
    x = t["1.weight"][:, None, None] * x + t["1.bias"][:, None, None]
    return F.conv2d(F.gelu(x), t["3.weight"], t["3.bias"], padding=1)


def reference_masks(segmentation, batch, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """LISA's decoding with the official SAM: image encoder (+ M2SA fusion of the first global
    block), no-mask dense prompt, one sparse prompt per [SEG], single-mask output."""
    sam = official_sam()
    sam_state = {k.removeprefix(SAM_PREFIX): v for k, v in segmentation.items()}
    compress = "mask_decoder.compress_vit."
    fusion = {k.removeprefix(compress): v for k, v in sam_state.items() if k.startswith(compress)}
    sam.load_state_dict({k: v for k, v in sam_state.items() if not k.startswith(compress)})
    early = []
    block = sam.image_encoder.blocks[FIRST_GLOBAL_BLOCK]
    block.register_forward_hook(lambda module, inputs, out: early.append(out))
    embeddings = sam.image_encoder(batch.sam_pixels)
    if fusion:
        embeddings = embeddings + compress_vit(early[0].permute(0, 3, 1, 2), fusion)
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    masks = []
    for image, image_prompts in enumerate(prompts):
        low_res, _ = sam.mask_decoder(
            image_embeddings=embeddings[image : image + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=image_prompts[:, None],
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        resized = tuple(batch.resized_sizes[image].tolist())
        original = tuple(batch.original_sizes[image].tolist())
        masks.append(sam.postprocess_masks(low_res, resized, original)[:, 0])
    return masks


def reference_chain_masks(
    segmentation, batch, coarse_prompts: list[torch.Tensor], prompts: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """CoReS's `model_forward` (model/CORES.py) with the official SAM: per image, the
    [SEG_SEMA] prompts decoded with no mask prompt, their low-resolution logits given back to the
    prompt encoder as `masks=` (its mask downscaling -> dense prompt) for the [SEG] prompts.
    Returns (coarse masks, final masks) per image at the original size."""
    sam = official_sam()
    sam.load_state_dict({k.removeprefix(SAM_PREFIX): v for k, v in segmentation.items()})
    embeddings = sam.image_encoder(batch.sam_pixels)
    coarse_masks, masks = [], []
    for image, (coarse, final) in enumerate(zip(coarse_prompts, prompts, strict=True)):
        resized = tuple(batch.resized_sizes[image].tolist())
        original = tuple(batch.original_sizes[image].tolist())
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        low_res, _ = sam.mask_decoder(
            image_embeddings=embeddings[image : image + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.cat(
                [sparse.expand(len(coarse), -1, -1), coarse[:, None]], 1
            ),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        coarse_masks.append(sam.postprocess_masks(low_res, resized, original)[:, 0])
        _, dense = sam.prompt_encoder(points=None, boxes=None, masks=low_res)
        final_low_res, _ = sam.mask_decoder(
            image_embeddings=embeddings[image : image + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.cat(
                [sparse.expand(len(final), -1, -1), final[:, None]], 1
            ),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks.append(sam.postprocess_masks(final_low_res, resized, original)[:, 0])
    return coarse_masks, masks


def reference(tensors, clip, batch, token_ids, rows, projector_mlp=None, lora=None) -> Reference:
    """tensors: legacy names (no PEFT prefix), fp32; lora: module -> (A, B)."""
    llama_state = {
        k: v
        for k, v in tensors.items()
        if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))
        and not k.endswith("inv_freq")
    }
    projector = (tensors["model.mm_projector.weight"], tensors["model.mm_projector.bias"])
    logits, hidden = reference_llm(
        llama_state, projector, clip, batch, token_ids.image, rows, lora or {}
    )
    mlp = projector_mlp or {
        k.removeprefix("model.text_hidden_fcs."): v
        for k, v in tensors.items()
        if k.startswith("model.text_hidden_fcs.")
    }
    conv, position = torch.nonzero(batch.input_ids[:, 1:] == token_ids.seg, as_tuple=True)
    states = hidden[conv, position]
    projected = F.linear(
        F.relu(F.linear(states, mlp["0.0.weight"], mlp["0.0.bias"])),
        mlp["0.2.weight"],
        mlp["0.2.bias"],
    )
    counts = torch.bincount(batch.conv_image[conv], minlength=len(IMAGE_SIZES)).tolist()
    prompts = list(projected.split(counts))
    segmentation = {k: v for k, v in tensors.items() if k.startswith(SAM_PREFIX)}
    return Reference(logits, prompts, reference_masks(segmentation, batch, prompts))


def assert_matches(model, tokenizer, legacy_added, expected: Reference, batch) -> None:
    with torch.no_grad():
        output = model(batch)
    columns = [0] * expected.logits.shape[-1]  # our id of each checkpoint row
    for ours, row in enumerate(checkpoint_rows(tokenizer, legacy_added).tolist()):
        if row < len(columns):
            columns[row] = ours
    real = batch.attention_mask
    assert expected.logits.std() > 0.5  # non-trivial values are compared
    torch.testing.assert_close(output.logits[..., columns][real], expected.logits[real], **TOL)
    for ours, theirs in zip(output.prompt_embeddings, expected.prompts, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    for ours, theirs in zip(output.pred_masks, expected.masks, strict=True):
        assert theirs.std() > 1e-3  # far above the tolerance
        torch.testing.assert_close(ours, theirs, **TOL)


def as_fp32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in tensors.items()}


def batch_for(model, tokenizer):
    return make_batch(model, tokenizer, IMAGE_SIZES, CONVERSATIONS, gt_masks=None, seed=5)


# --- tests --------------------------------------------------------------------------------------


def test_layouts_are_told_apart(legacy_assets, tiny_dir) -> None:
    assert detect_layout(legacy_assets.llava_v1.directory) is Layout.LLAVA_V1
    assert detect_layout(legacy_assets.lisa.directory) is Layout.LISA
    assert detect_layout(legacy_assets.m2sa.directory) is Layout.LISA
    assert detect_layout(tiny_dir / "llava_tiny") is Layout.HF_LLAVA
    # CLIP image settings: the legacy layouts keep them with CLIP, outside the checkpoint
    clip = legacy_assets.clip
    assert image_settings_directory(legacy_assets.lisa.directory, clip, Layout.LISA) == clip
    assert image_settings_directory(legacy_assets.llava_v1.directory, clip, Layout.LLAVA_V1) == clip
    hf = tiny_dir / "llava_tiny"
    for layout in (Layout.HF_LLAVA, Layout.MERGED):
        assert image_settings_directory(hf, clip, layout) == hf


def test_llava_v1_base_loads_as_the_papers_trained_from_it(legacy_assets, llava_v1_model) -> None:
    legacy = legacy_assets.llava_v1
    model, tokenizer = llava_v1_model
    ids = model.token_ids
    assert (ids.seg, ids.rej, ids.image, ids.im_start, ids.im_end) == (500, 501, 502, 503, 504)
    assert image_token_count(model.llava.config) == (32 // 8) ** 2
    batch = batch_for(model, tokenizer)
    rows = checkpoint_rows(tokenizer, ())
    # SAM from --vision_pretrained and a fresh projector: LISA's starting point
    sam = torch.load(legacy_assets.sam, weights_only=True)
    tensors = as_fp32(legacy.tensors) | {SAM_PREFIX + key: value for key, value in sam.items()}
    mlp = {k: v.detach() for k, v in model.text_hidden_fcs.state_dict().items()}
    expected = reference(tensors, clip_model(legacy_assets), batch, ids, rows, mlp)
    assert_matches(model, tokenizer, (), expected, batch)


@pytest.mark.parametrize("name", ["lisa", "m2sa"])
def test_lisa_family_directory_evaluates_and_fine_tunes_with_its_trained_parts(
    request, legacy_assets, name
) -> None:
    legacy = getattr(legacy_assets, name)
    model, tokenizer = request.getfixturevalue(f"{name}_model")
    ids = model.token_ids
    # the ids the embedding rows were trained at; new tokens appended after them
    assert (ids.seg, ids.im_start, ids.im_end, ids.rej, ids.image) == (500, 501, 502, 503, 504)
    assert (model.early_fusion is not None) == (name == "m2sa")
    batch = batch_for(model, tokenizer)
    rows = checkpoint_rows(tokenizer, LISA_TOKENS)
    expected = reference(as_fp32(legacy.tensors), clip_model(legacy_assets), batch, ids, rows)
    assert_matches(model, tokenizer, LISA_TOKENS, expected, batch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"sam.mask_decoder.iou_token.weight", "text_hidden_fcs.0.0.weight"} <= trainable


@pytest.mark.parametrize(("family", "naming"), [("GSVA", "old"), ("GSVA", "new"), ("LISA", "old")])
def test_training_time_state_dicts_load_over_a_llava_v1_base(
    legacy_assets, tmp_path, family, naming
) -> None:
    added = {"GSVA": GSVA_TOKENS, "LISA": LISA_TOKENS}[family]
    path = tmp_path / f"{family.lower()}-7b-ft.bin"
    tensors, lora = write_training_state_dict(path, added, naming)
    model, tokenizer = build(legacy_assets, legacy_assets.llava_v1.directory)
    load_weights(model, path)
    model.eval()
    batch = batch_for(model, tokenizer)
    clip = {k.removeprefix(CLIP_KEY_PREFIX): v for k, v in tensors.items() if CLIP_KEY_PREFIX in k}
    rows = checkpoint_rows(tokenizer, added)
    clip_tower = clip_model(legacy_assets, clip)
    expected = reference(tensors, clip_tower, batch, model.token_ids, rows, lora=lora)
    assert_matches(model, tokenizer, added, expected, batch)


@pytest.mark.parametrize("name", ["llava_v1", "lisa"])
def test_the_prompt_is_the_one_lisa_built_token_by_token(request, legacy_assets, name) -> None:
    model, tokenizer = request.getfixturevalue(f"{name}_model")
    sp = spm.SentencePieceProcessor(model_proto=legacy_assets.sp_model)
    ids, count = model.token_ids, image_token_count(model.llava.config)
    question = "<image>\n What is red circle in this image? Please output segmentation mask."
    template = template_for(tokenizer, "llava_v1")
    input_ids, _ = tokenize_conversation([(question, "[SEG].")], tokenizer, ids, count, template)
    # LISA: <image> written <im_start><image><im_end>, the text split at the image, each part
    # through transformers 4.31's slow LLaMA tokenizer, which strips the whitespace around
    # added tokens and encodes every text piece on its own with SentencePiece; one BOS.
    expected = [
        ids.bos,
        *sp.encode(f"{SYSTEM} USER:"),
        ids.im_start,
        *[ids.image] * count,
        ids.im_end,
        *sp.encode("What is red circle in this image? Please output segmentation mask. ASSISTANT:"),
        ids.seg,
        *sp.encode("."),
        ids.eos,
    ]
    assert input_ids.tolist() == expected
    prompt = tokenize_prompt([(question, None)], tokenizer, ids, count, template)
    assert prompt.tolist() == expected[: expected.index(ids.seg)]


def test_a_wrong_lora_rank_or_an_unknown_key_is_named(legacy_assets, tmp_path) -> None:
    path = tmp_path / "gsva.bin"
    write_training_state_dict(path, GSVA_TOKENS, "old")
    model, _ = build(legacy_assets, legacy_assets.llava_v1.directory, lora_r=2)
    with pytest.raises(ValueError, match=r"(?s)gsva\.bin.*lora_A.*--lora_r"):
        load_weights(model, path)
    state = torch.load(path, weights_only=True)
    state[PEFT + "model.adapter.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"gsva\.bin: 1 keys have no place.*model\.adapter\.weight"
    ):
        load_weights(model, path)


def test_a_layout_that_cannot_be_mapped_fails_naming_file_layout_and_keys(
    legacy_assets, tmp_path
) -> None:
    directory = tmp_path / "LISA-7B-v1"
    shutil.copytree(legacy_assets.lisa.directory, directory)
    shard = directory / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "model.sam_adapter.weight": torch.zeros(1)}, shard)
    with pytest.raises(ValueError) as error:
        build(legacy_assets, directory)
    for part in (str(shard), "lisa layout", "model.sam_adapter.weight", "nothing was loaded"):
        assert part in str(error.value)


def test_a_lisa_directory_without_its_tokenizer_ids_or_clip_stops(legacy_assets, tmp_path) -> None:
    directory = tmp_path / "LISA-7B-v1"
    shutil.copytree(legacy_assets.lisa.directory, directory)
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        build(legacy_assets, directory, vision_tower="openai/clip-vit-large-patch14")
    (directory / "added_tokens.json").unlink()
    with pytest.raises(ValueError, match=r"500 tokens \(lacking \['\[SEG\]'.*503 rows"):
        build(legacy_assets, directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        build(legacy_assets, directory)


@pytest.mark.parametrize("name", ["llava_v1", "lisa"])
def test_a_legacy_weight_file_holding_code_is_refused_and_never_run(
    legacy_assets, tmp_path, name
) -> None:
    directory = tmp_path / name
    shutil.copytree(getattr(legacy_assets, name).directory, directory)
    marker = tmp_path / "code_ran"
    shard = write_unsafe_file(directory / "pytorch_model-00001-of-00002.bin", marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        build(legacy_assets, directory)
    message = str(error.value)
    assert message.startswith(f"{shard}: refusing to load: it holds Python objects")
    assert f"it would build {os.mkdir.__module__}.mkdir" in message and "never code" in message
    assert "\n" not in message and not marker.exists()


def test_the_layout_is_detected_once_per_load(legacy_assets, monkeypatch) -> None:
    """`Segmentation.load` detects the layout once and hands it to the builder, the legacy
    reader and the image settings (each used to detect it again)."""
    calls = []
    check = layouts.check_model_directory  # detect_layout's first step, called once per call

    def counting(directory):
        calls.append(directory)
        return check(directory)

    monkeypatch.setattr(layouts, "check_model_directory", counting)
    lisa = legacy_assets.lisa.directory
    loaded = Segmentation.load(
        str(lisa), precision="fp32", device="cpu", vision_tower=str(legacy_assets.clip)
    )
    assert [Path(directory) for directory in calls] == [lisa]
    assert loaded.model.token_ids.seg == SP_VOCAB


CORES_CONVERSATIONS = [
    Conversation(0, "Can you segment the red circle in this image?", CORES_ANSWER),
    Conversation(
        1, "Please segment the yellow car.", "Sure, it appears on [SEG_SEMA]. It is [SEG]."
    ),
    Conversation(1, "What is the green star in this image?", CORES_ANSWER),
]


def test_a_cores_directory_decodes_its_chain_as_cores_did(legacy_assets, cores_model) -> None:
    """CoReS's merged directory: [SEG_SEMA] and [SEG] keep the ids they were trained at, the
    chain token is taken from the checkpoint's tokenizer, and the final masks equal CoReS's
    two-pass decoding with the official SAM (the coarse logits as the dense mask prompt)."""
    model, tokenizer = cores_model
    ids = model.token_ids
    assert (ids.chain, ids.seg, ids.im_start, ids.im_end, ids.rej, ids.image) == (
        500,
        501,
        502,
        503,
        504,
        505,
    )
    tensors = as_fp32(legacy_assets.cores.tensors)
    batch = make_batch(model, tokenizer, IMAGE_SIZES, CORES_CONVERSATIONS, gt_masks=None, seed=5)
    with torch.no_grad():
        output = model(batch)
    rows = checkpoint_rows(tokenizer, CORES_TOKENS)
    llama_state = {
        k: v
        for k, v in tensors.items()
        if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))
    }
    projector = (tensors["model.mm_projector.weight"], tensors["model.mm_projector.bias"])
    _, hidden = reference_llm(
        llama_state, projector, clip_model(legacy_assets), batch, ids.image, rows, {}
    )
    mlp = {
        k.removeprefix("model.text_hidden_fcs."): v
        for k, v in tensors.items()
        if k.startswith("model.text_hidden_fcs.")
    }

    def projected(token: int) -> list[torch.Tensor]:
        conv, position = torch.nonzero(batch.input_ids[:, 1:] == token, as_tuple=True)
        states = hidden[conv, position]
        out = F.linear(
            F.relu(F.linear(states, mlp["0.0.weight"], mlp["0.0.bias"])),
            mlp["0.2.weight"],
            mlp["0.2.bias"],
        )
        counts = torch.bincount(batch.conv_image[conv], minlength=len(IMAGE_SIZES)).tolist()
        return list(out.split(counts))

    segmentation = {k: v for k, v in tensors.items() if k.startswith(SAM_PREFIX)}
    coarse, final = reference_chain_masks(
        segmentation, batch, projected(ids.chain), projected(ids.seg)
    )
    for ours, theirs in zip(output.coarse_masks, coarse, strict=True):
        assert theirs.std() > 1e-3
        torch.testing.assert_close(ours, theirs, **TOL)
    for ours, theirs in zip(output.pred_masks, final, strict=True):
        assert theirs.std() > 1e-3
        torch.testing.assert_close(ours, theirs, **TOL)
    # the chain matters: the final masks differ from [SEG] decoded without its coarse prompt
    plain = reference_masks(segmentation, batch, projected(ids.seg))
    assert max((a - b).abs().max() for a, b in zip(plain, final, strict=True)) > 1e-3
    assert [source.tolist() for source in output.coarse_source] == [[0], [0, 1]]


def test_a_cores_training_time_state_dict_loads_over_a_llava_v1_base(
    legacy_assets, tmp_path
) -> None:
    """Four added rows are CoReS's ([SEG_SEMA], [SEG], <im_start>, <im_end>) when the run has a
    chain token, GSVA's otherwise: each row lands on its own token."""
    path = tmp_path / "cores-7b.bin"
    tensors, lora = write_training_state_dict(path, CORES_TOKENS, "old")
    model, tokenizer = build(
        legacy_assets, legacy_assets.llava_v1.directory, chain_token="[SEG_SEMA]"
    )
    load_weights(model, path)
    embed = model.llava.get_input_embeddings().weight
    stored = tensors["model.embed_tokens.weight"]
    for offset, token in enumerate(CORES_TOKENS):
        torch.testing.assert_close(
            embed[tokenizer.convert_tokens_to_ids(token)], stored[SP_VOCAB + offset]
        )


LASAGNA_CONVERSATIONS = [
    Conversation(
        0,
        "<semantic>Segment this image.<cat_start> red circle, blue square <cat_end>",
        "red circle<ins>blue square<no_ins>",
    ),
    Conversation(
        1,
        "<semantic>Please segment this image.<cat_start> yellow car, green star <cat_end>",
        "yellow car<ins>green star<ins>",
    ),
]


def test_a_lasagna_directory_keeps_its_vocabulary_and_ids_as_trained(legacy_assets) -> None:
    """LaSagnA-7B's merged directory: its tokenizer holds <ins> and no [SEG], so it loads with
    the lasagna vocabulary (whatever was asked) and every added token at its trained id."""
    model, tokenizer = build(
        legacy_assets, legacy_assets.lasagna.directory, vision_pretrained="", vocabulary="lisa"
    )
    ids = model.token_ids
    assert tokenizer.convert_tokens_to_ids(list(LASAGNA_TOKENS)) == list(range(500, 507))
    assert (ids.seg, ids.rej, ids.im_start, ids.im_end, ids.image) == (503, 504, 505, 506, 507)
    assert "[SEG]" not in tokenizer.get_vocab() and "[REJ]" not in tokenizer.get_vocab()
    assert ids.chain is None


def test_the_lasagna_prompt_is_the_one_lasagna_built_token_by_token(
    legacy_assets, lasagna_model
) -> None:
    """The pipeline's "red circle[SEG]blue square[REJ]" is LaSagnA's "red circle<ins>blue
    square<no_ins>": its text split at every added token, each piece through 4.31's slow LLaMA
    tokenizer (whitespace around added tokens stripped), labels on the answer."""
    model, tokenizer = lasagna_model
    sp = spm.SentencePieceProcessor(model_proto=legacy_assets.sp_model)
    ids, count = model.token_ids, image_token_count(model.llava.config)
    added = dict(zip(LASAGNA_TOKENS, range(SP_VOCAB, SP_VOCAB + len(LASAGNA_TOKENS)), strict=True))
    question = "<image>\n<semantic>Segment this image.<cat_start> red circle, blue square <cat_end>"
    template = template_for(tokenizer, "llava_v1")
    rounds = [(question, "red circle[SEG]blue square[REJ]")]
    input_ids, labels = tokenize_conversation(rounds, tokenizer, ids, count, template)
    before_answer = [
        ids.bos,
        *sp.encode(f"{SYSTEM} USER:"),
        added["<im_start>"],
        *[ids.image] * count,
        added["<im_end>"],
        added["<semantic>"],
        *sp.encode("Segment this image."),
        added["<cat_start>"],
        *sp.encode("red circle, blue square"),
        added["<cat_end>"],
    ]
    # "ASSISTANT: red circle" is one piece, between <cat_end> and <ins>
    expected = [
        *before_answer,
        *sp.encode("ASSISTANT: red circle"),
        added["<ins>"],
        *sp.encode("blue square"),
        added["<no_ins>"],
        ids.eos,
    ]
    assert input_ids.tolist() == expected
    labelled = [token for token in labels.tolist() if token >= 0]
    answer = expected[len(expected) - len(labelled) :]
    assert labelled == answer and answer[: len(sp.encode("red circle"))] == sp.encode("red circle")
    generation = tokenize_prompt([(question, None)], tokenizer, ids, count, template)
    assert generation.tolist() == [*before_answer, *sp.encode("ASSISTANT:")]


def test_a_lasagna_directory_prompts_the_decoder_with_each_ins(
    legacy_assets, lasagna_model
) -> None:
    """Each <ins> prompts SAM as LaSagnA's model_forward does (the official decoder on the
    projected hidden state before it), each <no_ins> is a target with no decoder call."""
    model, tokenizer = lasagna_model
    ids = model.token_ids
    batch = make_batch(model, tokenizer, IMAGE_SIZES, LASAGNA_CONVERSATIONS, gt_masks=None, seed=5)
    assert int((batch.input_ids == ids.seg).sum()) == 3
    assert int((batch.input_ids == ids.rej).sum()) == 1
    tensors = as_fp32(legacy_assets.lasagna.tensors)
    rows = checkpoint_rows(tokenizer, LASAGNA_TOKENS)
    expected = reference(tensors, clip_model(legacy_assets), batch, ids, rows)
    with torch.no_grad():
        output = model(batch)
    assert [rej.tolist() for rej in output.target_is_rej] == [[False, True], [False, False]]
    columns = [0] * expected.logits.shape[-1]
    for ours, row in enumerate(rows.tolist()):
        if row < len(columns):
            columns[row] = ours
    real = batch.attention_mask
    torch.testing.assert_close(output.logits[..., columns][real], expected.logits[real], **TOL)
    for image, (prompts, masks) in enumerate(zip(expected.prompts, expected.masks, strict=True)):
        present = ~output.target_is_rej[image]
        assert masks.std() > 1e-3
        torch.testing.assert_close(output.prompt_embeddings[image][present], prompts, **TOL)
        torch.testing.assert_close(output.pred_masks[image][present], masks, **TOL)


def test_a_lasagna_training_time_state_dict_loads_over_a_llava_v1_base(
    legacy_assets, tmp_path
) -> None:
    """Over a LLaVA-v1 base with the lasagna vocabulary (LaSagnA's own starting point) each of
    LaSagnA's seven added rows lands on its own token."""
    path = tmp_path / "lasagna-7b.bin"
    tensors, _ = write_training_state_dict(path, LASAGNA_TOKENS, "old")
    model, tokenizer = build(legacy_assets, legacy_assets.llava_v1.directory, vocabulary="lasagna")
    load_weights(model, path)
    stored = {
        "model.embed_tokens.weight": model.llava.get_input_embeddings().weight,
        "lm_head.weight": model.llava.get_output_embeddings().weight,
    }
    for key, rows in stored.items():
        for offset, token in enumerate(LASAGNA_TOKENS):
            torch.testing.assert_close(
                rows[tokenizer.convert_tokens_to_ids(token)], tensors[key][SP_VOCAB + offset]
            )
