"""SAM 2 as the segmenter, on transformers' ``Sam2Model``: a declared key mapping to/from the
original ``sam2.1_hiera_*.pt`` layout (facebookresearch/sam2), strict loading with the size read
from tensor shapes, and the encode / decode / postprocess steps the segmenter calls.

What differs from SAM (``model.sam``), as the official ``SAM2ImagePredictor`` does it:
- the image encoder (Hiera + FPN neck) gives three levels: the stride-16 embedding, to which the
  learnt ``no_mem_embed`` is added (a single image has no memory), and two high-resolution levels
  (strides 4 and 8) that the decoder's ``conv_s0``/``conv_s1`` project and its upscaling adds;
- the input is the whole image resized to S x S (no padding; ``utils.preprocess.Sam2Transform``)
  and the low-resolution masks are resized straight to the original size.
The decoder takes one sparse token per `[SEG]` as SAM does, single-mask output (mask token 0),
with SAM 2's stability fallback to the multimask tokens off: it exists only outside training,
so it would make evaluation decode differently from what training taught.
The video-tracking parts of an original checkpoint (memory attention and encoder, object
pointers) are declared and left out: one image has no memory.
Shapes: S input side, g = S/16 embedding grid, D prompt/decoder width, k prompts of one image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from transformers import Sam2Config, Sam2Model
from transformers.models.sam2.configuration_sam2 import (
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

from model.key_map import KeyMap, assign_state, count_numbered, tie

# SAM2Base builds its decoder's two-way transformer with 8 heads, whatever its width.
SAM2_DECODER_HEADS = 8
STAGES = 4
# Hiera doubles width and heads at every stage; the FPN levels the decoder reads are the
# strides 4, 8 (high resolution) and 16 (the image embedding), the patch embedding's stride is 4
EMBEDDING_STRIDE = 16
LEVEL_STRIDES = (4, 8, 16)
PATCH_STRIDE = 4
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
TRUNK = "image_encoder.trunk."
# what only SAM 2's original checkpoints hold: its Hiera trunk, its decoder (model.mask_models
# tells SAM 2 files from SAM's by them)
ORIGINAL_PREFIXES = (TRUNK, "sam_mask_decoder.")


@dataclass(frozen=True)
class Sam2Size:
    """What a Hiera trunk's weights do not show (heads, windows, global blocks, input side), and
    for building it without weights (`sam2_config_from_preset`) its positional-embedding
    background and the prompt width of its released decoder."""

    name: str
    num_heads: int
    window_spec: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    image_size: int = 1024
    background: tuple[int, int] = (7, 7)
    prompt_dim: int = 256


# keyed by what the weights show: (trunk width, blocks per stage); from sam2.1_hiera_*.yaml and
# Hiera's defaults (window_spec (8, 4, 14, 7), global blocks (12, 16, 20))
SAM2_SIZES: dict[tuple[int, tuple[int, ...]], Sam2Size] = {
    (96, (1, 2, 7, 2)): Sam2Size("hiera_t", 1, (8, 4, 14, 7), (5, 7, 9)),
    (96, (1, 2, 11, 2)): Sam2Size("hiera_s", 1, (8, 4, 14, 7), (7, 10, 13)),
    (112, (2, 3, 16, 3)): Sam2Size("hiera_b+", 2, (8, 4, 14, 7), (12, 16, 20), background=(14, 14)),
    (144, (2, 6, 36, 4)): Sam2Size("hiera_l", 2, (8, 4, 16, 8), (23, 33, 43)),
    # ours, for tests and the demo (model.tiny): 128-pixel input, embedding grid 8
    (8, (1, 1, 2, 1)): Sam2Size(
        "tiny", 1, (8, 4, 4, 2), (3,), image_size=128, background=(4, 4), prompt_dim=32
    ),
}

SAM2_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("no_mem_embed", "no_memory_embedding"),
    ("image_encoder.trunk.{pos}", "vision_encoder.backbone.{pos}"),
    (
        "image_encoder.trunk.patch_embed.proj.{p}",
        "vision_encoder.backbone.patch_embed.projection.{p}",
    ),
    (
        "image_encoder.trunk.blocks.{i}.norm{n}.{p}",
        "vision_encoder.backbone.blocks.{i}.layer_norm{n}.{p}",
    ),
    (
        "image_encoder.trunk.blocks.{i}.{hiera}.{p}",
        "vision_encoder.backbone.blocks.{i}.{hiera}.{p}",
    ),
    (
        "image_encoder.trunk.blocks.{i}.mlp.layers.0.{p}",
        "vision_encoder.backbone.blocks.{i}.mlp.proj_in.{p}",
    ),
    (
        "image_encoder.trunk.blocks.{i}.mlp.layers.1.{p}",
        "vision_encoder.backbone.blocks.{i}.mlp.proj_out.{p}",
    ),
    ("image_encoder.neck.convs.{i}.conv.{p}", "vision_encoder.neck.convs.{i}.{p}"),
    (
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("sam_prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("sam_prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("sam_prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    ("sam_prompt_encoder.{prompt_embedding}.weight", "prompt_encoder.{prompt_embedding}.weight"),
    (
        "sam_mask_decoder.transformer.layers.{i}.norm{n}.{p}",
        "mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}",
    ),
    (
        "sam_mask_decoder.transformer.norm_final_attn.{p}",
        "mask_decoder.transformer.layer_norm_final_attn.{p}",
    ),
    (
        "sam_mask_decoder.transformer.{decoder_attn}.out_proj.{p}",
        "mask_decoder.transformer.{decoder_attn}.o_proj.{p}",
    ),
    (
        "sam_mask_decoder.transformer.{decoder_attn}.{qkv}.{p}",
        "mask_decoder.transformer.{decoder_attn}.{qkv}.{p}",
    ),
    (
        "sam_mask_decoder.transformer.layers.{i}.mlp.layers.0.{p}",
        "mask_decoder.transformer.layers.{i}.mlp.proj_in.{p}",
    ),
    (
        "sam_mask_decoder.transformer.layers.{i}.mlp.layers.1.{p}",
        "mask_decoder.transformer.layers.{i}.mlp.proj_out.{p}",
    ),
    ("sam_mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("sam_mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("sam_mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    ("sam_mask_decoder.{head}.layers.0.{p}", "mask_decoder.{head}.proj_in.{p}"),
    ("sam_mask_decoder.{head}.layers.1.{p}", "mask_decoder.{head}.layers.0.{p}"),
    ("sam_mask_decoder.{head}.layers.2.{p}", "mask_decoder.{head}.proj_out.{p}"),
    ("sam_mask_decoder.{decoder_part}.{p}", "mask_decoder.{decoder_part}.{p}"),
    ("sam_mask_decoder.{decoder_token}.weight", "mask_decoder.{decoder_token}.weight"),
)
_SLOTS = {
    "i": r"\d+",
    "n": r"[1-4]",
    "p": r"weight|bias",
    "pos": r"pos_embed|pos_embed_window",
    "hiera": r"attn\.qkv|attn\.proj|proj",
    "qkv": r"[qkv]_proj",
    "decoder_attn": r"final_attn_token_to_image|layers\.\d+\."
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)",
    "head": r"output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head",
    "decoder_part": r"conv_s0|conv_s1",
    "decoder_token": r"iou_token|mask_tokens|obj_score_token",
    "prompt_embedding": r"not_a_point_embed|no_mask_embed",
}
_KEY_MAP = KeyMap(SAM2_KEY_MAP, _SLOTS)
# The original's four point embeddings [1, D] are the rows of transformers' one table [4, D].
POINT_EMBEDDING = "sam_prompt_encoder.point_embeddings.{}.weight"
POINT_TABLE = "prompt_encoder.point_embed.weight"
# transformers keeps a second copy of the Fourier matrix in the prompt encoder: tied key -> source
TIED_HF_KEYS = {
    "prompt_encoder.shared_embedding.positional_embedding": (
        "shared_image_embedding.positional_embedding"
    ),
}
# The video-tracking parts of SAM2Base: read, declared, and left out (one image has no memory).
TRACKING_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
)
TRACKING_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")
# Keys whose shapes define the architecture; absent ones mean "not a SAM 2 checkpoint".
REQUIRED_ORIGINAL_KEYS = (
    "no_mem_embed",
    "image_encoder.trunk.pos_embed",
    "image_encoder.trunk.pos_embed_window",
    "image_encoder.trunk.patch_embed.proj.weight",
    "image_encoder.neck.convs.0.conv.weight",
    "sam_prompt_encoder.mask_downscaling.3.weight",
    "sam_mask_decoder.mask_tokens.weight",
    "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight",
    "sam_mask_decoder.iou_prediction_head.layers.0.weight",
)


def is_tracking_key(key: str) -> bool:
    """Whether an original key belongs to SAM 2's video-tracking parts (left out)."""
    return key.startswith(TRACKING_PREFIXES) or key in TRACKING_KEYS


def convert_original_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original ``sam2.1_hiera_*.pt`` state dict -> transformers ``Sam2Model`` layout (tensors
    shared; the point embeddings stacked; the tracking parts left out; the tied copy added)."""
    converted: dict[str, Tensor] = {}
    points: dict[int, Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        if is_tracking_key(key):
            continue
        if key.startswith("sam_prompt_encoder.point_embeddings."):
            points[int(key.split(".")[2])] = tensor
            continue
        mapped = _KEY_MAP.to_hf(key)
        if mapped is None:
            unknown.append(key)
        else:
            converted[mapped] = tensor
    if unknown:
        raise ValueError(f"unexpected keys (not SAM 2 parameters): {sorted(unknown)}")
    if points:
        if sorted(points) != list(range(len(points))):
            raise ValueError(f"point embeddings are not numbered 0..n-1: {sorted(points)}")
        converted[POINT_TABLE] = torch.cat([points[index] for index in range(len(points))])
    for tied, source in TIED_HF_KEYS.items():
        if source in converted:
            converted[tied] = converted[source]
    return converted


def to_original_state_dict(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``Sam2Model`` state dict -> the original layout (its image parts; tied copy dropped)."""
    original: dict[str, Tensor] = {}
    for key, tensor in hf_sd.items():
        if key in TIED_HF_KEYS:
            continue
        if key == POINT_TABLE:
            # each row its own tensor: the files written from it must not share storage
            for index, row in enumerate(tensor.split(1)):
                original[POINT_EMBEDDING.format(index)] = row.clone()
            continue
        mapped = _KEY_MAP.to_original(key)
        if mapped is None:
            raise ValueError(f"not a Sam2Model parameter key: {key!r}")
        original[mapped] = tensor
    return original


def original_key_names(keys: list[str]) -> list[str]:
    """The original names of transformers keys, for messages: the point table as its rows'
    pattern, the tied copy left out, an unmapped key as it is."""
    names = []
    for key in keys:
        if key == POINT_TABLE:
            names.append(POINT_EMBEDDING.format("*"))
        elif key not in TIED_HF_KEYS:
            names.append(_KEY_MAP.to_original(key) or key)
    return names


def _trunk_stages(sd: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Blocks per stage: a stage's first block (after the first stage) changes the width and
    so holds a ``proj``."""
    depth = count_numbered(sd, TRUNK + "blocks")
    starts = [0] + [j for j in range(depth) if f"{TRUNK}blocks.{j}.proj.weight" in sd]
    if len(starts) != STAGES:
        raise ValueError(f"a Hiera trunk has {STAGES} stages, found {len(starts)} stage starts")
    return tuple(end - start for start, end in zip(starts, [*starts[1:], depth], strict=True))


def size_from_state_dict(sd: Mapping[str, Tensor]) -> tuple[int, tuple[int, ...], Sam2Size]:
    """(trunk width, blocks per stage, its `Sam2Size`), read from the trunk's shapes."""
    width = sd[TRUNK + "patch_embed.proj.weight"].shape[0]
    stages = _trunk_stages(sd)
    size = SAM2_SIZES.get((width, stages))
    if size is None:
        known = {entry.name: key for key, entry in SAM2_SIZES.items()}
        raise ValueError(
            f"a Hiera trunk of width {width} with {stages} blocks per stage is none of the known "
            f"SAM 2 sizes {known}"
        )
    return width, stages, size


def sam2_config(
    *,
    width: int,
    stages: tuple[int, ...],
    size: Sam2Size,
    background: tuple[int, int],
    prompt_dim: int,
    mask_input_channels: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    num_multimask_outputs: int = 3,
    iou_head_hidden_dim: int = 256,
) -> Sam2Config:
    """A ``Sam2Config`` with every dimension explicit (widths and heads double per stage)."""
    side = size.image_size
    widths = [width * 2**stage for stage in range(STAGES)]
    backbone = Sam2HieraDetConfig(
        hidden_size=width,
        num_attention_heads=size.num_heads,
        image_size=[side, side],
        window_positional_embedding_background_size=list(background),
        blocks_per_stage=list(stages),
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[size.num_heads * 2**stage for stage in range(STAGES)],
        window_size_per_stage=list(size.window_spec),
        global_attention_blocks=list(size.global_att_blocks),
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[side // stride] * 2 for stride in LEVEL_STRIDES],
        fpn_hidden_size=prompt_dim,
    )
    prompt = Sam2PromptEncoderConfig(
        hidden_size=prompt_dim,
        image_size=side,
        patch_size=EMBEDDING_STRIDE,
        mask_input_channels=mask_input_channels,
    )
    decoder = Sam2MaskDecoderConfig(
        hidden_size=prompt_dim,
        mlp_dim=decoder_mlp_dim,
        num_hidden_layers=decoder_depth,
        num_attention_heads=SAM2_DECODER_HEADS,
        num_multimask_outputs=num_multimask_outputs,
        iou_head_hidden_dim=iou_head_hidden_dim,
        dynamic_multimask_via_stability=False,
    )
    return Sam2Config(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


def sam2_config_from_state_dict(sd: Mapping[str, Tensor]) -> Sam2Config:
    """The full ``Sam2Config`` of an original-layout state dict, from its shapes and the size
    table (`SAM2_SIZES`). Works on meta tensors."""
    if missing := [key for key in REQUIRED_ORIGINAL_KEYS if key not in sd]:
        raise ValueError(f"not a SAM 2 checkpoint (original layout): missing keys {missing}")
    width, stages, size = size_from_state_dict(sd)
    return sam2_config(
        width=width,
        stages=stages,
        size=size,
        background=tuple(sd[TRUNK + "pos_embed"].shape[-2:]),
        prompt_dim=sd["image_encoder.neck.convs.0.conv.weight"].shape[0],
        mask_input_channels=sd["sam_prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=count_numbered(sd, "sam_mask_decoder.transformer.layers"),
        decoder_mlp_dim=sd["sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight"].shape[0],
        num_multimask_outputs=sd["sam_mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_hidden_dim=sd["sam_mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )


def sam2_config_from_preset(name: str) -> Sam2Config:
    """Config of a named size (``hiera_t``, ``hiera_s``, ``hiera_b+``, ``hiera_l``, ``tiny``)
    with SAM2Base's decoder (MLP 2048, IoU head 256, as it hard-codes) at the size's prompt
    width; the official package builds every one of them."""
    for (width, stages), size in SAM2_SIZES.items():
        if size.name == name:
            return sam2_config(
                width=width,
                stages=stages,
                size=size,
                background=size.background,
                prompt_dim=size.prompt_dim,
            )
    raise ValueError(
        f"unknown SAM 2 size {name!r}; known: {[size.name for size in SAM2_SIZES.values()]}"
    )


def sam2_from_original_state_dict(
    state: Mapping[str, Tensor], source: str, dtype: torch.dtype | None = None
) -> Sam2Model:
    """``Sam2Model`` (eval mode) holding an original-layout state dict, config read from shapes.

    ``source`` names where the tensors came from in error messages; loading is strict (the
    tracking parts are the declared exception).
    """
    try:
        config = sam2_config_from_state_dict(state)
        hf_state = convert_original_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    return assign_state(
        Sam2Model,
        config,
        hf_state,
        source,
        original_key_names,
        TIED_HF_KEYS,
        dtype,
    )


def build_sam2(config: Sam2Config) -> Sam2Model:
    """Randomly initialised ``Sam2Model`` in eval mode, its tied copy tied."""
    model = Sam2Model(config)
    tie(model, TIED_HF_KEYS)
    return model.eval()


def save_sam2_checkpoint(model: Sam2Model, path: str | Path) -> None:
    """Write ``model`` in the original layout: ``{"model": state}`` in a .pt/.pth file as the
    released checkpoints are, or flat in a .safetensors file."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: unsupported checkpoint suffix; use one of {CHECKPOINT_SUFFIXES}")
    state = {
        key: tensor.detach().cpu().contiguous()
        for key, tensor in to_original_state_dict(model.state_dict()).items()
    }
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)


def input_size(sam: Sam2Model) -> int:
    """The side S of the square input."""
    return sam.config.prompt_encoder_config.image_size


@torch.no_grad()
def encode_levels(sam: Sam2Model, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen image encoder, run once: pixel_values [B,3,S,S] (normalised) -> the FPN levels
    [B,D,4g,4g], [B,D,2g,2g] and the embedding [B,D,g,g] with ``no_mem_embed`` added."""
    dtype = sam.vision_encoder.backbone.patch_embed.projection.weight.dtype
    levels = sam.vision_encoder(pixel_values.to(dtype)).fpn_hidden_states
    embedding = levels[-1] + sam.no_memory_embedding.reshape(1, -1, 1, 1)
    return levels[0], levels[1], embedding


def project_high_res(sam: Sam2Model, level0: Tensor, level1: Tensor) -> tuple[Tensor, Tensor]:
    """The decoder's trainable projections of the high-resolution levels (differentiable):
    -> [B,D/8,4g,4g], [B,D/4,2g,2g]."""
    decoder = sam.mask_decoder
    return decoder.conv_s0(level0), decoder.conv_s1(level1)


def no_mask_dense_embedding(sam: Sam2Model) -> Tensor:
    """Dense prompt used when no mask prompt is given: ``no_mask_embed`` broadcast, [1,D,g,g]."""
    grid = sam.prompt_encoder.image_embedding_size
    return sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(-1, -1, *grid)


def mask_prompt_embeddings(sam: Sam2Model, low_res: Tensor) -> Tensor:
    """Low-resolution mask logits [K,4g,4g] as the dense prompt [K,D,g,g] (differentiable),
    through ``prompt_encoder.mask_embed`` (the original's ``mask_downscaling``)."""
    side = tuple(sam.prompt_encoder.mask_input_size)
    if low_res.dim() != 3 or tuple(low_res.shape[-2:]) != side:
        raise ValueError(
            f"expected low-resolution mask logits [K,{side[0]},{side[1]}], got "
            f"{tuple(low_res.shape)}"
        )
    embed = sam.prompt_encoder.mask_embed
    return embed(low_res[:, None].to(embed.conv1.weight.dtype))


def decode(
    sam: Sam2Model,
    embedding: Tensor,
    high_res: tuple[Tensor, Tensor],
    prompts: Tensor,
    dense: Tensor,
) -> tuple[Tensor, Tensor]:
    """One mask-decoder call for K prompts on each of B images (differentiable).

    embedding [B,D,g,g], high_res ([B,D/8,4g,4g], [B,D/4,2g,2g]), prompts [B,K,D], dense
    [B,D,g,g] or [1,D,g,g] -> (low-res mask logits [B,K,4g,4g], predicted IoU [B,K]); each
    (image, prompt) pair decoded independently; single-mask output.
    """
    if embedding.dim() != 4 or prompts.dim() != 3 or len(prompts) != len(embedding):
        raise ValueError(
            f"expected image embeddings [B,D,g,g] and prompts [B,K,D], got "
            f"{tuple(embedding.shape)} and {tuple(prompts.shape)}"
        )
    decoder = sam.mask_decoder
    dtype = decoder.iou_token.weight.dtype
    positional = sam.get_image_wide_positional_embeddings().to(dtype)
    masks, iou, _, _ = decoder(
        image_embeddings=embedding.to(dtype),
        image_positional_embeddings=positional.expand(len(embedding), -1, -1, -1),
        sparse_prompt_embeddings=prompts.to(dtype)[:, :, None, :],
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
        high_resolution_features=[level.to(dtype) for level in high_res],
    )
    return masks[:, :, 0], iou[:, :, 0]


def postprocess_masks(low_res: Tensor, original_size: tuple[int, int]) -> Tensor:
    """Mask logits [k,h,w] -> float32 [k,H,W]: one bilinear resize to the original image, as
    ``SAM2Transforms.postprocess_masks`` (the input was the whole image, unpadded)."""
    upsample = partial(F.interpolate, mode="bilinear", align_corners=False)
    return upsample(low_res[:, None].float(), size=tuple(original_size))[:, 0]
