"""The mask model behind `[SEG]`: SAM or SAM 2, one interface.

`MASK_MODELS` holds one `MaskModelKind` per model, data like `model.backbone.Family`: what the
segmenter calls (encode the images once, decode prompts on a grid or row by row, embed a mask as
a dense prompt, post-process to the image's size) and how its tensors live on disk (the original
layout of its released checkpoints). `kind_of` picks the kind of a built model,
`kind_of_state` the kind of an original-layout state dict (SAM 2's files hold a Hiera trunk and
a `sam_mask_decoder`), so `--vision_pretrained` picks SAM or SAM 2 by the file's contents and a
merged checkpoint by its `model.visual_model.*` tensors. Only `model.sam` and `model.sam2` name
either model's internals.

Image embeddings travel as `ImageEmbeddings`: the embedding [N,D,g,g] and, for SAM 2, the two
projected high-resolution levels [N,D/8,4g,4g] and [N,D/4,2g,2g]; indexing selects images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Sam2Model, SamModel

from model import sam, sam2
from model.tensor_files import read_tensor_file

VISION_PRETRAINED_EXPECTED = (
    "--vision_pretrained takes an original segment-anything checkpoint such as "
    "sam_vit_h_4b8939.pth (https://github.com/facebookresearch/segment-anything) or an original "
    "SAM 2 checkpoint such as sam2.1_hiera_large.pt (https://github.com/facebookresearch/sam2)"
)
STATE_WRAPPERS = ("model", "state_dict")
MAX_LISTED_KEYS = 5


@dataclass
class ImageEmbeddings:
    """embedding [N,D,g,g]; high_res: SAM 2's ([N,D/8,4g,4g], [N,D/4,2g,2g]), () for SAM."""

    embedding: Tensor
    high_res: tuple[Tensor, ...] = ()

    def __getitem__(self, index) -> ImageEmbeddings:
        return ImageEmbeddings(self.embedding[index], tuple(t[index] for t in self.high_res))

    def __len__(self) -> int:
        return len(self.embedding)


@dataclass(frozen=True)
class MaskModelKind:
    """One mask model. Shapes: B images, K prompts each, T rows, D prompt width, g grid.

    encode(model, pixels [B,3,S,S], early_layer) -> (ImageEmbeddings, SAM's ViT block output
        [B,C,g,g] or None); the frozen encoder without gradients, trainable parts with them.
    decode_grid(model, embeddings of B, prompts [B,K,D]) -> (low-res logits [B,K,4g,4g], IoU
        [B,K]); decode_rows(model, embeddings of T, prompts [T,D], dense [T,D,g,g]) -> ([T,4g,4g],
        [T]); mask_prompt(model, low-res [K,4g,4g]) -> dense [K,D,g,g]; no_mask_dense(model) ->
        [1,D,g,g]; postprocess(model, low-res [k,h,w], resized (h',w'), original (H,W)) ->
        float32 [k,H,W].
    """

    name: str
    model_class: type[nn.Module]
    encode: Callable[[nn.Module, Tensor, int | None], tuple[ImageEmbeddings, Tensor | None]]
    decode_grid: Callable[[nn.Module, ImageEmbeddings, Tensor], tuple[Tensor, Tensor]]
    decode_rows: Callable[[nn.Module, ImageEmbeddings, Tensor, Tensor], tuple[Tensor, Tensor]]
    mask_prompt: Callable[[nn.Module, Tensor], Tensor]
    no_mask_dense: Callable[[nn.Module], Tensor]
    postprocess: Callable[[nn.Module, Tensor, tuple[int, int], tuple[int, int]], Tensor]
    input_size: Callable[[nn.Module], int]
    decoder_heads: Callable[[nn.Module], int]
    encoder_macs: Callable[[nn.Module], float]
    to_original: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    from_original: Callable[[Mapping[str, Tensor], str, torch.dtype | None, int | None], nn.Module]
    early_fusion: bool


def _sam_encode(model: SamModel, pixels: Tensor, early_layer: int | None):
    embedding, early = sam.encode_images(model, pixels, early_layer)
    return ImageEmbeddings(embedding), early


def _sam_input_size(model: SamModel) -> int:
    return model.config.vision_config.image_size


def _sam_macs(model: SamModel) -> float:
    """Multiply-accumulates of the ViT per image: every parameter once per patch token."""
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    return float(sum(p.numel() for p in model.vision_encoder.parameters()) * tokens)


SAM_KIND = MaskModelKind(
    name="sam",
    model_class=SamModel,
    encode=_sam_encode,
    decode_grid=lambda model, e, prompts: sam.decode_prompt_grid(model, e.embedding, prompts),
    decode_rows=lambda model, e, prompts, dense: sam.decode_prompt_rows(
        model, e.embedding, prompts, dense
    ),
    mask_prompt=sam.mask_prompt_embeddings,
    no_mask_dense=sam.no_mask_dense_embedding,
    postprocess=lambda model, low, resized, original: sam.postprocess_masks(
        low, _sam_input_size(model), resized, original
    ),
    input_size=_sam_input_size,
    decoder_heads=lambda model: model.config.mask_decoder_config.num_attention_heads,
    encoder_macs=_sam_macs,
    to_original=sam.to_original_state_dict,
    from_original=sam.sam_from_original_state_dict,
    early_fusion=True,
)


def _sam2_encode(model: Sam2Model, pixels: Tensor, early_layer: int | None):
    if early_layer is not None:
        raise ValueError("M2SA's early-feature fusion reads a SAM ViT block; SAM 2 has none")
    level0, level1, embedding = sam2.encode_levels(model, pixels)
    return ImageEmbeddings(embedding, sam2.project_high_res(model, level0, level1)), None


def _sam2_rows(model: Sam2Model, e: ImageEmbeddings, prompts: Tensor, dense: Tensor):
    masks, iou = sam2.decode(model, e.embedding, e.high_res, prompts[:, None], dense)
    return masks[:, 0], iou[:, 0]


def _sam2_macs(model: Sam2Model) -> float:
    """Multiply-accumulates of Hiera and the neck per image: each block's parameters once per
    token of its stage's grid (S/4 halved per stage), each neck conv once per level token."""
    backbone = model.config.vision_config.backbone_config
    side = sam2.input_size(model) // sam2.PATCH_STRIDE
    trunk = model.vision_encoder.backbone
    stage_of = [s for s, n in enumerate(backbone.blocks_per_stage) for _ in range(n)]
    macs = sum(
        sum(p.numel() for p in block.parameters()) * (side // 2 ** stage_of[j]) ** 2
        for j, block in enumerate(trunk.blocks)
    )
    macs += sum(p.numel() for p in trunk.patch_embed.parameters()) * side**2
    for level, conv in enumerate(model.vision_encoder.neck.convs):
        macs += sum(p.numel() for p in conv.parameters()) * (side // 2 ** (3 - level)) ** 2
    return float(macs)


SAM2_KIND = MaskModelKind(
    name="sam2",
    model_class=Sam2Model,
    encode=_sam2_encode,
    decode_grid=lambda model, e, prompts: sam2.decode(
        model, e.embedding, e.high_res, prompts, sam2.no_mask_dense_embedding(model)
    ),
    decode_rows=_sam2_rows,
    mask_prompt=sam2.mask_prompt_embeddings,
    no_mask_dense=sam2.no_mask_dense_embedding,
    postprocess=lambda model, low, resized, original: sam2.postprocess_masks(low, original),
    input_size=sam2.input_size,
    decoder_heads=lambda model: sam2.SAM2_DECODER_HEADS,
    encoder_macs=_sam2_macs,
    to_original=sam2.to_original_state_dict,
    from_original=lambda state, source, dtype, heads: sam2.sam2_from_original_state_dict(
        state, source, dtype
    ),
    early_fusion=False,
)

MASK_MODELS = {kind.name: kind for kind in (SAM_KIND, SAM2_KIND)}


def kind_of(model: nn.Module) -> MaskModelKind:
    """The kind of a built mask model."""
    for kind in MASK_MODELS.values():
        if isinstance(model, kind.model_class):
            return kind
    raise TypeError(f"not a supported mask model: {type(model).__name__}")


def kind_of_state(state: Mapping[str, object]) -> MaskModelKind:
    """SAM 2 when the original-layout keys hold its Hiera trunk or `sam_mask_decoder`."""
    if any(str(key).startswith(sam2.ORIGINAL_PREFIXES) for key in state):
        return SAM2_KIND
    return SAM_KIND


def _unwrap(state: Mapping[str, object]) -> Mapping[str, object]:
    """The tensors of a file holding them under a lone `model` / `state_dict` entry (the
    released SAM 2 files: `{"model": ...}`)."""
    if any(isinstance(value, Tensor) for value in state.values()):
        return state
    for wrapper in STATE_WRAPPERS:
        if isinstance(state.get(wrapper), Mapping):
            return state[wrapper]
    return state


def read_vision_pretrained(path: str | Path) -> Mapping[str, Tensor]:
    """The original-layout tensors of a SAM or SAM 2 checkpoint file, checked to be one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"--vision_pretrained {path} is a directory; {VISION_PRETRAINED_EXPECTED}"
        )
    if path.suffix not in sam.CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported checkpoint suffix; use one of {sam.CHECKPOINT_SUFFIXES}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"--vision_pretrained {path} does not exist; {VISION_PRETRAINED_EXPECTED}"
        )
    state = _unwrap(read_tensor_file(path, hint=VISION_PRETRAINED_EXPECTED))
    keys = [str(key) for key in state]
    prefixes = (sam.ORIGINAL_ENCODER_PREFIX, *sam2.ORIGINAL_PREFIXES)
    if not any(key.startswith(prefixes) for key in keys):
        missing = [key for key in sam.REQUIRED_ORIGINAL_KEYS if key not in state]
        raise ValueError(
            f"{path}: not a SAM or SAM 2 checkpoint (original layout): missing keys {missing}; "
            f"its {len(keys)} keys look like {sorted(keys)[:MAX_LISTED_KEYS]}; "
            f"{VISION_PRETRAINED_EXPECTED}"
        )
    return state


def mask_model_from_state(
    state: Mapping[str, Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    decoder_heads: int | None = None,
) -> nn.Module:
    """SAM or SAM 2 (eval mode) from original-layout tensors, strictly; kind by the keys."""
    return kind_of_state(state).from_original(state, source, dtype, decoder_heads)


def load_mask_model(
    path: str | Path, dtype: torch.dtype | None = None, decoder_heads: int | None = None
) -> nn.Module:
    """`--vision_pretrained`: SAM or SAM 2 by the file's contents, loaded strictly."""
    return mask_model_from_state(read_vision_pretrained(path), str(path), dtype, decoder_heads)
