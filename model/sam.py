"""Segment Anything (SAM) on transformers' ``SamModel``: presets and configs, a declared key mapping
to/from the original segment-anything checkpoint layout, strict loading with the architecture
inferred from tensor shapes, M2SA's early-feature fusion, and the encode / decode / postprocess
helpers of the segmenter. Shapes: S input side, g = S/patch grid, C ViT width, D prompt/decoder
width, k prompts of one image.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import (
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)
from transformers.models.sam.modeling_sam import SamLayerNorm

from model.key_map import KeyMap, assign_state, count_numbered

MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
# Decoder head count cannot be read from weight shapes: SAM uses 8; narrower decoders keep at
# least this many channels per self-attention head (the tiny preset's 32 wide -> 2 heads).
SAM_DECODER_HEADS = 8
MIN_DECODER_HEAD_DIM = 16
# Both SAM implementations hard-code 3-layer hypernetwork MLPs; the key mapping assumes the IoU
# head has the same depth (it does in every released checkpoint).
HEAD_MLP_DEPTH = 3
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
ORIGINAL_ENCODER_PREFIX = "image_encoder."

_REAL_SAM = {"image_size": 1024, "patch_size": 16, "window_size": 14}
SAM_PRESETS: dict[str, dict[str, Any]] = {
    "vit_h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": (7, 15, 23, 31),
        **_REAL_SAM,
    },
    "vit_l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": (5, 11, 17, 23),
        **_REAL_SAM,
    },
    "vit_b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": (2, 5, 8, 11),
        **_REAL_SAM,
    },
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "global_attn_indexes": (1,),
        "window_size": 4,
        "image_size": 64,
        "patch_size": 8,
        "prompt_dim": 32,
        "mask_input_channels": 16,
        "decoder_mlp_dim": 64,
        "decoder_heads": 2,
        "iou_head_hidden_dim": 32,
    },
}

# Original-layout key <-> transformers key, one template pair per parameter family, read in both
# directions. A ``{slot}`` matches the regex in _SLOTS and is copied to the other side.
SAM_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.patch_embed.proj.{p}", "vision_encoder.patch_embed.projection.{p}"),
    ("image_encoder.blocks.{i}.norm{n}.{p}", "vision_encoder.layers.{i}.layer_norm{n}.{p}"),
    ("image_encoder.blocks.{i}.{vit_block}", "vision_encoder.layers.{i}.{vit_block}"),
    ("image_encoder.neck.0.weight", "vision_encoder.neck.conv1.weight"),
    ("image_encoder.neck.1.{p}", "vision_encoder.neck.layer_norm1.{p}"),
    ("image_encoder.neck.2.weight", "vision_encoder.neck.conv2.weight"),
    ("image_encoder.neck.3.{p}", "vision_encoder.neck.layer_norm2.{p}"),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.{i}.weight", "prompt_encoder.point_embed.{i}.weight"),
    ("prompt_encoder.mask_downscaling.0.{p}", "prompt_encoder.mask_embed.conv1.{p}"),
    ("prompt_encoder.mask_downscaling.1.{p}", "prompt_encoder.mask_embed.layer_norm1.{p}"),
    ("prompt_encoder.mask_downscaling.3.{p}", "prompt_encoder.mask_embed.conv2.{p}"),
    ("prompt_encoder.mask_downscaling.4.{p}", "prompt_encoder.mask_embed.layer_norm2.{p}"),
    ("prompt_encoder.mask_downscaling.6.{p}", "prompt_encoder.mask_embed.conv3.{p}"),
    (
        "mask_decoder.transformer.layers.{i}.norm{n}.{p}",
        "mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}",
    ),
    (
        "mask_decoder.transformer.norm_final_attn.{p}",
        "mask_decoder.transformer.layer_norm_final_attn.{p}",
    ),
    ("mask_decoder.output_upscaling.0.{p}", "mask_decoder.upscale_conv1.{p}"),
    ("mask_decoder.output_upscaling.1.{p}", "mask_decoder.upscale_layer_norm.{p}"),
    ("mask_decoder.output_upscaling.3.{p}", "mask_decoder.upscale_conv2.{p}"),
    ("mask_decoder.{head}.layers.0.{p}", "mask_decoder.{head}.proj_in.{p}"),
    ("mask_decoder.{head}.layers.1.{p}", "mask_decoder.{head}.layers.0.{p}"),
    ("mask_decoder.{head}.layers.2.{p}", "mask_decoder.{head}.proj_out.{p}"),
    (
        "mask_decoder.transformer.{decoder_attn}.{proj}.{p}",
        "mask_decoder.transformer.{decoder_attn}.{proj}.{p}",
    ),
    (
        "mask_decoder.transformer.layers.{i}.mlp.{lin}.{p}",
        "mask_decoder.transformer.layers.{i}.mlp.{lin}.{p}",
    ),
    ("{embedding}.weight", "{embedding}.weight"),
)
_SLOTS = {
    "i": r"\d+",
    "n": r"[1-4]",
    "p": r"weight|bias",
    "lin": r"lin1|lin2",
    "proj": r"[qkv]_proj|out_proj",
    "vit_block": r"attn\.rel_pos_[hw]|(?:attn\.qkv|attn\.proj|mlp\.lin[12])\.(?:weight|bias)",
    "decoder_attn": r"final_attn_token_to_image|layers\.\d+\."
    r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)",
    "head": r"output_hypernetworks_mlps\.\d+|iou_prediction_head",
    "embedding": r"prompt_encoder\.(?:not_a_point_embed|no_mask_embed)"
    r"|mask_decoder\.(?:iou_token|mask_tokens)",
}
# transformers ties this copy to the one pe_layer matrix: tied key -> source key.
TIED_HF_KEYS = {
    "prompt_encoder.shared_embedding.positional_embedding": (
        "shared_image_embedding.positional_embedding"
    ),
}
# Normalisation buffers of the original Sam; our callers normalise pixels themselves.
DROPPED_ORIGINAL_KEYS = ("pixel_mean", "pixel_std")
# Keys whose shapes define the architecture; absent ones mean "not a SAM checkpoint".
REQUIRED_ORIGINAL_KEYS = (
    "image_encoder.pos_embed",
    "image_encoder.patch_embed.proj.weight",
    "image_encoder.blocks.0.attn.rel_pos_h",
    "image_encoder.blocks.0.mlp.lin1.weight",
    "image_encoder.neck.0.weight",
    "prompt_encoder.mask_downscaling.3.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
)


_KEY_MAP = KeyMap(SAM_KEY_MAP, _SLOTS)


def original_to_hf_key(key: str) -> str:
    """Map one original segment-anything key to its transformers ``SamModel`` key."""
    mapped = _KEY_MAP.to_hf(key)
    if mapped is None:
        raise ValueError(f"not a SAM parameter key: {key!r}")
    return mapped


def hf_to_original_key(key: str) -> str:
    """Map one transformers ``SamModel`` key (tied copies included) to the original layout."""
    mapped = _KEY_MAP.to_original(TIED_HF_KEYS.get(key, key))
    if mapped is None:
        raise ValueError(f"not a SamModel parameter key: {key!r}")
    return mapped


def convert_original_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original-layout state dict -> transformers layout (tensors shared, tied copy added)."""
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        if key in DROPPED_ORIGINAL_KEYS:
            continue
        mapped = _KEY_MAP.to_hf(key)
        if mapped is None:
            unknown.append(key)
        else:
            converted[mapped] = tensor
    if unknown:
        raise ValueError(f"unexpected keys (not SAM parameters): {sorted(unknown)}")
    for tied, source in TIED_HF_KEYS.items():
        if source in converted:
            converted[tied] = converted[source]
    return converted


def to_original_state_dict(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Transformers-layout state dict -> original segment-anything layout (tied copy dropped)."""
    return {
        hf_to_original_key(key): tensor for key, tensor in hf_sd.items() if key not in TIED_HF_KEYS
    }


def sam_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    global_attn_indexes: tuple[int, ...] | list[int],
    window_size: int = 14,
    image_size: int = 1024,
    patch_size: int = 16,
    mlp_dim: int | None = None,
    prompt_dim: int = 256,
    mask_input_channels: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = SAM_DECODER_HEADS,
    num_multimask_outputs: int = 3,
    iou_head_depth: int = HEAD_MLP_DEPTH,
    iou_head_hidden_dim: int = 256,
    initializer_range: float = 0.02,
) -> SamConfig:
    """A ``SamConfig`` with every dimension explicit; the three sub-configs agree by construction.

    ``hidden_size`` is the ViT width C (``mlp_dim`` defaults to 4*C), ``prompt_dim`` the neck /
    prompt / decoder width D (even: the Fourier PE has D/2 frequencies), grid = image / patch.
    """
    if image_size % patch_size or prompt_dim % 2 or hidden_size % num_attention_heads:
        raise ValueError(
            f"inconsistent SAM dims: image {image_size} / patch {patch_size}, prompt "
            f"{prompt_dim} (even), width {hidden_size} / heads {num_attention_heads}"
        )
    vision = SamVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        global_attn_indexes=list(global_attn_indexes),
        window_size=window_size,
        image_size=image_size,
        patch_size=patch_size,
        mlp_dim=mlp_dim if mlp_dim is not None else MLP_RATIO * hidden_size,
        output_channels=prompt_dim,
        num_pos_feats=prompt_dim // 2,
        layer_norm_eps=LAYER_NORM_EPS,
        initializer_range=initializer_range,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=prompt_dim,
        image_size=image_size,
        patch_size=patch_size,
        mask_input_channels=mask_input_channels,
        layer_norm_eps=LAYER_NORM_EPS,
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=prompt_dim,
        mlp_dim=decoder_mlp_dim,
        num_hidden_layers=decoder_depth,
        num_attention_heads=decoder_heads,
        num_multimask_outputs=num_multimask_outputs,
        iou_head_depth=iou_head_depth,
        iou_head_hidden_dim=iou_head_hidden_dim,
        layer_norm_eps=LAYER_NORM_EPS,
    )
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
        initializer_range=initializer_range,
    )


def sam_config_from_preset(name: str) -> SamConfig:
    """Config of a named preset (``vit_h``, ``vit_l``, ``vit_b``, ``tiny``)."""
    if name not in SAM_PRESETS:
        raise ValueError(f"unknown SAM preset {name!r}; known: {sorted(SAM_PRESETS)}")
    return sam_config(**SAM_PRESETS[name])


def build_sam(config: SamConfig) -> SamModel:
    """Randomly initialised ``SamModel`` in eval mode."""
    return SamModel(config).eval()


def _default_decoder_heads(width: int) -> int:
    return max(1, min(SAM_DECODER_HEADS, width // MIN_DECODER_HEAD_DIM))


def _vision_dims(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """ViT dims from shapes: pos_embed [1,g,g,C], patch kernel, rel_pos_h [2*side-1, C/heads]."""
    _, grid, _, width = sd["image_encoder.pos_embed"].shape
    patch = sd["image_encoder.patch_embed.proj.weight"].shape[-1]
    depth = count_numbered(sd, "image_encoder.blocks")
    rel_pos_keys = [f"image_encoder.blocks.{j}.attn.rel_pos_h" for j in range(depth)]
    if missing := [key for key in rel_pos_keys if key not in sd]:
        raise ValueError(f"missing keys {missing}")
    rows, head_dim = zip(*(sd[key].shape for key in rel_pos_keys), strict=True)
    global_rows = 2 * grid - 1
    windows = {(side + 1) // 2 for side in rows if side != global_rows}
    if len(windows) > 1:
        raise ValueError(f"windowed blocks disagree on the window size: {sorted(windows)}")
    return {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": width // head_dim[0],
        "global_attn_indexes": tuple(j for j, side in enumerate(rows) if side == global_rows),
        # An all-global encoder never partitions into windows, so 0 is as good as any size.
        "window_size": windows.pop() if windows else 0,
        "image_size": grid * patch,
        "patch_size": patch,
        "mlp_dim": sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
    }


def sam_config_from_state_dict(
    sd: Mapping[str, Tensor], decoder_heads: int | None = None
) -> SamConfig:
    """Infer the full ``SamConfig`` of an original-layout state dict from its shapes alone.

    Works on meta tensors. The decoder head count is invisible in the weights: ``decoder_heads``
    overrides the default, which is SAM's 8 heads reduced to keep at least 16 channels per head
    for narrow decoders (width 256 -> 8, width 32 -> 2).
    """
    if missing := [key for key in REQUIRED_ORIGINAL_KEYS if key not in sd]:
        raise ValueError(f"not a SAM checkpoint (original layout): missing keys {missing}")
    iou_depth = count_numbered(sd, "mask_decoder.iou_prediction_head.layers")
    if iou_depth != HEAD_MLP_DEPTH:
        raise ValueError(
            f"IoU head depth {iou_depth} unsupported (key mapping is for {HEAD_MLP_DEPTH})"
        )
    prompt_dim = sd["image_encoder.neck.0.weight"].shape[0]
    if decoder_heads is None:
        decoder_heads = _default_decoder_heads(prompt_dim)
    return sam_config(
        **_vision_dims(sd),
        prompt_dim=prompt_dim,
        mask_input_channels=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=count_numbered(sd, "mask_decoder.transformer.layers"),
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        decoder_heads=decoder_heads,
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )


def _check_suffix(path: Path) -> None:
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: unsupported checkpoint suffix; use one of {CHECKPOINT_SUFFIXES}")


def sam_from_original_state_dict(
    state: Mapping[str, Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    decoder_heads: int | None = None,
) -> SamModel:
    """``SamModel`` (eval mode) holding an original-layout state dict, config read from shapes.

    ``source`` names where the tensors came from in error messages; loading is strict.
    """
    try:
        config = sam_config_from_state_dict(state, decoder_heads=decoder_heads)
        hf_state = convert_original_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    return assign_state(
        SamModel,
        config,
        hf_state,
        source,
        lambda keys: [hf_to_original_key(key) for key in keys],
        TIED_HF_KEYS,
        dtype,
    )


def save_sam_checkpoint(model: SamModel, path: str | Path) -> None:
    """Write ``model`` in the original segment-anything layout (.pth/.pt/.bin/.safetensors)."""
    path = Path(path)
    _check_suffix(path)
    decoder = model.config.mask_decoder_config
    if decoder.num_attention_heads != _default_decoder_heads(decoder.hidden_size):
        warnings.warn(
            f"{path}: decoder heads ({decoder.num_attention_heads}) are not stored in the original "
            f"layout; load with decoder_heads={decoder.num_attention_heads}",
            stacklevel=2,
        )
    original = to_original_state_dict(model.state_dict())
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in original.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


class EarlyFusion(nn.Sequential):
    """M2SA fusion of an early ViT block's features: [B,C_in,g,g] -> [B,C_out,g,g].

    A ``Sequential`` (not a wrapper) so parameters are named ``0.*``, ``1.*``, ``3.*`` like M2SA's
    ``compress_vit`` and its checkpoints load unchanged.
    """

    KERNEL = 3

    def __init__(self, in_channels: int, out_channels: int) -> None:
        padding = self.KERNEL // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, self.KERNEL, padding=padding),
            SamLayerNorm(out_channels, eps=LAYER_NORM_EPS, data_format="channels_first"),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, self.KERNEL, padding=padding),
        )


def first_global_layer(config: SamConfig) -> int:
    """Index of the first global-attention ViT block (7 for ViT-H)."""
    indexes = config.vision_config.global_attn_indexes
    if not indexes:
        raise ValueError("this SAM encoder has no global-attention block")
    return min(indexes)


@torch.no_grad()
def encode_images(
    sam: SamModel, pixel_values: Tensor, early_layer: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Frozen image encoder, run once.

    pixel_values [B,3,S,S] (normalised, padded) -> (image embeddings [B,D,g,g], output of ViT block
    ``early_layer`` as [B,C,g,g] or None).
    """
    captured: list[Tensor] = []
    hook = None
    if early_layer is not None:
        hook = sam.vision_encoder.layers[early_layer].register_forward_hook(
            lambda _module, _inputs, output: captured.append(output)
        )
    # Pixels usually arrive in fp32 while the encoder may run in bf16/fp16.
    dtype = sam.vision_encoder.patch_embed.projection.weight.dtype
    try:
        embeddings = sam.vision_encoder(pixel_values.to(dtype)).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    # ViT blocks are channels-last [B,g,g,C].
    early = captured[0].permute(0, 3, 1, 2) if captured else None
    return embeddings, early


def dense_positional_embedding(sam: SamModel) -> Tensor:
    """Random-Fourier positional encoding of the embedding grid, [1,D,g,g]."""
    return sam.get_image_wide_positional_embeddings()


def no_mask_dense_embedding(sam: SamModel) -> Tensor:
    """Dense prompt used when no mask prompt is given: ``no_mask_embed`` broadcast, [1,D,g,g]."""
    grid = sam.config.prompt_encoder_config.image_embedding_size
    return sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(-1, -1, grid, grid)


def decode_prompt_grid(
    sam: SamModel, image_embeddings: Tensor, prompts: Tensor
) -> tuple[Tensor, Tensor]:
    """One mask-decoder call for K prompts on each of B images (differentiable).

    image_embeddings [B,D,g,g], prompts [B,K,D] -> (low-res mask logits [B,K,4g,4g], predicted
    IoU [B,K]); single-mask output, no mask prompt. Every (image, prompt) pair is decoded
    independently, so padding prompts do not change the others' masks.
    """
    if image_embeddings.dim() != 4 or prompts.dim() != 3 or len(prompts) != len(image_embeddings):
        raise ValueError(
            f"expected image embeddings [B,D,g,g] and prompts [B,K,D], got "
            f"{tuple(image_embeddings.shape)} and {tuple(prompts.shape)}"
        )
    decoder = sam.mask_decoder
    # Prompts come from the language model, possibly in another dtype than the decoder.
    dtype = decoder.iou_token.weight.dtype
    positional = dense_positional_embedding(sam).to(dtype)
    masks, iou = decoder(
        image_embeddings=image_embeddings.to(dtype),
        image_positional_embeddings=positional.expand(len(image_embeddings), -1, -1, -1),
        # [B images, K prompt sets, 1 token each, D]
        sparse_prompt_embeddings=prompts.to(dtype)[:, :, None, :],
        dense_prompt_embeddings=no_mask_dense_embedding(sam).to(dtype),
        multimask_output=False,
    )
    return masks[:, :, 0], iou[:, :, 0]


def mask_prompt_embeddings(sam: SamModel, low_res: Tensor) -> Tensor:
    """Low-resolution mask logits as SAM's dense prompt (differentiable).

    low_res [K,4g,4g] (the decoder's output resolution, which is SAM's mask-input one) ->
    [K,D,g,g] through ``prompt_encoder.mask_embed`` (segment-anything's ``mask_downscaling``,
    what ``PromptEncoder(masks=low_res_masks)`` computes), one call for all K.
    """
    side = 4 * sam.config.prompt_encoder_config.image_embedding_size
    if low_res.dim() != 3 or low_res.shape[-2:] != (side, side):
        raise ValueError(
            f"expected low-resolution mask logits [K,{side},{side}], got {tuple(low_res.shape)}"
        )
    embed = sam.prompt_encoder.mask_embed
    return embed(low_res[:, None].to(embed.conv1.weight.dtype))


def decode_prompt_rows(
    sam: SamModel, image_embeddings: Tensor, prompts: Tensor, dense: Tensor
) -> tuple[Tensor, Tensor]:
    """One mask-decoder call for T independent rows, each its own image, sparse prompt and dense
    prompt (differentiable).

    image_embeddings [T,D,g,g], prompts [T,D], dense [T,D,g,g] (``mask_prompt_embeddings``, or
    ``no_mask_dense_embedding`` expanded) -> (low-res mask logits [T,4g,4g], predicted IoU [T]);
    single-mask output.
    """
    rows = len(prompts)
    if (
        image_embeddings.dim() != 4
        or prompts.dim() != 2
        or dense.shape != image_embeddings.shape
        or len(image_embeddings) != rows
    ):
        raise ValueError(
            f"expected image embeddings [T,D,g,g], prompts [T,D] and dense prompts [T,D,g,g], "
            f"got {tuple(image_embeddings.shape)}, {tuple(prompts.shape)}, {tuple(dense.shape)}"
        )
    decoder = sam.mask_decoder
    dtype = decoder.iou_token.weight.dtype
    positional = dense_positional_embedding(sam).to(dtype)
    masks, iou = decoder(
        image_embeddings=image_embeddings.to(dtype),
        image_positional_embeddings=positional.expand(rows, -1, -1, -1),
        # [T rows, 1 prompt set, 1 token, D]
        sparse_prompt_embeddings=prompts.to(dtype)[:, None, None, :],
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )
    return masks[:, 0, 0], iou[:, 0, 0]


def decode_masks_with_scores(
    sam: SamModel, image_embedding: Tensor, prompts: Tensor
) -> tuple[Tensor, Tensor]:
    """Decode k prompt embeddings of one image in a single mask-decoder call (differentiable).

    image_embedding [D,g,g] or [1,D,g,g], prompts [k,D] -> (low-res mask logits [k,4g,4g],
    predicted IoU [k]); single-mask output, no mask prompt.
    """
    if image_embedding.dim() == 3:
        image_embedding = image_embedding.unsqueeze(0)
    if image_embedding.shape[0] != 1 or prompts.dim() != 2:
        raise ValueError(
            f"expected one image embedding and [k,D] prompts, got "
            f"{tuple(image_embedding.shape)} and {tuple(prompts.shape)}"
        )
    masks, iou = decode_prompt_grid(sam, image_embedding, prompts[None])
    return masks[0], iou[0]


def decode_masks(sam: SamModel, image_embedding: Tensor, prompts: Tensor) -> Tensor:
    """``decode_masks_with_scores`` without the scores: low-res mask logits [k,4g,4g]."""
    return decode_masks_with_scores(sam, image_embedding, prompts)[0]


def postprocess_masks(
    low_res: Tensor, input_size: int, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> Tensor:
    """Mask logits back to the original image: [k,h,w] -> float32 [k,H,W].

    Bilinear to the padded square input (``input_size``), crop the resized image (padding is
    right/bottom), bilinear to ``original_size`` (H,W). Interpolated in fp32 for accuracy.
    """
    upsample = partial(F.interpolate, mode="bilinear", align_corners=False)
    masks = upsample(low_res[:, None].float(), size=(input_size, input_size))
    masks = masks[..., : resized_size[0], : resized_size[1]]
    return upsample(masks, size=tuple(original_size))[:, 0]
