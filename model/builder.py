"""Building a segmenter from files: load the `--version` directory (any layout of
`model.layouts`) and the SAM checkpoint, add the segmentation tokens, wrap LoRA, set the
trainable set. The `Segmenter` constructor itself does no I/O; this is the one place that does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from model.backbone import (
    family_of,
    init_new_rows_normal,
    init_new_token_rows,
    load_llava,
    load_tokenizer,
    resize_embeddings_to_mean,
)
from model.checkpoint import (
    FUSION_PREFIX,
    PROJECTOR_PREFIX,
    SEGMENTER_CONFIG_FILE,
    SegmenterFileConfig,
    load_into,
    read_segmentation_tensors,
    read_segmenter_config,
    segmentation_parts,
)
from model.layouts import (
    LEGACY_LAYOUTS,
    Layout,
    LoadedBackbone,
    detect_layout,
    load_legacy_backbone,
    uses_lisa_tokenization,
)
from model.lora import apply_lora, set_trainable
from model.losses import LossWeights
from model.mask_models import kind_of, load_mask_model
from model.sam import EarlyFusion, first_global_layer
from model.segmenter import Segmenter, build_projector
from model.tokens import (
    DEFAULT_VOCABULARY,
    LLAVA_IMAGE_TOKENS,
    ImageTokens,
    TokenIds,
    add_segmentation_tokens,
    vocabulary_for,
)

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the segmenter (train_ds.py fills it from its flags).

    version: Hugging Face LLaVA directory (weights, config, tokenizer, image processor), our
        merged checkpoint, a legacy LLaVA-v1 base or a merged LISA-family directory.
    vision_pretrained: SAM checkpoint in the original segment-anything layout.
    vision_tower: local CLIP directory; read only for the legacy layouts, which keep CLIP
        outside their files.
    precision: fp32 | bf16 | fp16, the dtype the weights are loaded in.
    attn_implementation: sdpa | flash_attention_2 | eager.
    gradient_checkpointing: recompute LLM activations in backward to save memory.
    use_mm_start_end: add `<im_start>`/`<im_end>` tokens around the image tokens.
    out_dim: width of the projected `[SEG]` embedding: SAM's prompt width, read from the SAM
        file (or the merged checkpoint's SAM) when None; a given value must equal it.
    lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA on the language model
        (lora_r 0 = no LoRA, language model frozen apart from embeddings and LM head).
    train_mask_decoder: train SAM's mask decoder (else frozen).
    train_mm_projector: also train LLaVA's multimodal projector (frozen by default).
    early_fusion: M2SA early-feature fusion (first global-attention block of the SAM ViT).
    loss_weights: weights of CE, BCE and Dice.
    new_token_init: (token, word) pairs, new tokens whose rows start as the word's first token
        (`model.backbone.init_new_token_rows`); the others start as `new_token_rows` says.
    new_token_rows: "mean" (the mean of the old rows) or "normal" (N(0, initializer_range), as
        the LISA family's transformers 4.31 drew them).
    chain_token: a token whose predicted coarse mask prompts the next `[SEG]`/`[REJ]` of its
        conversation (`--chain_token`, CoReS's "[SEG_SEMA]"; model.segmenter); None = none.
    supervise_coarse: also BCE + Dice on each coarse mask against the ground truth of the
        target it prompts (`--supervise_coarse`; needs a chain token).
    vocabulary: the strings of the seg/rej roles in the tokenizer (`--vocabulary`,
        `model.tokens.VOCABULARIES`: "lisa" `[SEG]`/`[REJ]`, "lasagna" `<ins>`/`<no_ins>` and
        LaSagnA's special tokens); a trained checkpoint keeps the one it was trained with.
    """

    version: str
    vision_pretrained: str
    vision_tower: str | None = None
    precision: str = "bf16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    use_mm_start_end: bool = True
    out_dim: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train_mask_decoder: bool = True
    train_mm_projector: bool = False
    early_fusion: bool = False
    loss_weights: LossWeights = field(default_factory=LossWeights)
    new_token_init: tuple[tuple[str, str], ...] = ()
    new_token_rows: str = "mean"
    chain_token: str | None = None
    supervise_coarse: bool = False
    vocabulary: str = DEFAULT_VOCABULARY

    @property
    def dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision must be one of {sorted(PRECISIONS)}, not {self.precision!r}"
            )
        return PRECISIONS[self.precision]


def build_segmenter(config: ModelConfig, layout: Layout | None = None):
    """Load and assemble the segmenter. Returns (Segmenter, tokenizer with the new tokens).

    `config.version` is a LLaVA directory, HF or LLaVA-v1 (SAM then comes from
    `config.vision_pretrained`, the projector and fusion start random), our merged checkpoint
    (`model.checkpoint`) or a merged LISA-family directory, whose SAM, projector, fusion and
    image-token wrapping are used as saved. layout: its layout as the caller detected it
    (`model.layouts.detect_layout`, once per run); detected here when None.
    """
    dtype = config.dtype
    llava, tokenizer, token_ids, parts, base_size = load_backbone(config, layout)
    rows = llava.get_input_embeddings().weight.shape[0]
    first_new_id = rows if base_size is None else min(rows, base_size)
    resize_embeddings_to_mean(llava, len(tokenizer), first_new_id)
    if config.new_token_rows == "normal":
        init_new_rows_normal(llava, first_new_id, end=len(tokenizer))
    init_new_token_rows(llava, tokenizer, dict(config.new_token_init), first_new_id)
    apply_lora(
        llava, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
    )
    if config.gradient_checkpointing:
        llava.activation_checkpointing_enable({"use_reentrant": False})
    sam = parts.sam if parts else load_mask_model(config.vision_pretrained, dtype=dtype)
    source = config.version if parts else config.vision_pretrained
    prompt_dim = sam.config.mask_decoder_config.hidden_size
    if config.out_dim is not None and config.out_dim != prompt_dim:
        raise ValueError(
            f"--out_dim {config.out_dim} must equal the SAM prompt width {prompt_dim} of {source}"
        )
    projector = build_projector(llava.config.text_config.hidden_size, prompt_dim).to(dtype)
    early_fusion = early_layer = None
    # a trained checkpoint's architecture is what it was trained with, whatever the recipe says
    fusion = bool(parts.fusion) if parts else config.early_fusion
    if parts and config.early_fusion and not fusion:
        LOGGER.warning("%s was trained without early fusion; --early_fusion is ignored", source)
    if fusion:
        if not kind_of(sam).early_fusion:
            raise ValueError(
                f"--early_fusion (M2SA) fuses a SAM ViT block; {source} is a "
                f"{kind_of(sam).name} model without one"
            )
        early_layer = first_global_layer(sam.config)
        early_fusion = EarlyFusion(sam.config.vision_config.hidden_size, prompt_dim).to(dtype)
    if parts:
        load_into(projector, parts.projector, config.version, PROJECTOR_PREFIX)
        if parts.fusion:
            load_into(early_fusion, parts.fusion, config.version, FUSION_PREFIX)
    model = Segmenter(
        llava=llava,
        sam=sam,
        text_hidden_fcs=projector,
        token_ids=token_ids,
        loss_weights=config.loss_weights,
        early_fusion=early_fusion,
        early_layer=early_layer,
        supervise_coarse=config.supervise_coarse,
    )
    set_trainable(model, config.train_mask_decoder, config.train_mm_projector)
    return model, tokenizer


def load_backbone(config: ModelConfig, layout: Layout | None = None) -> LoadedBackbone:
    """The LLaVA, its tokenizer with the segmentation tokens and any trained segmentation parts,
    from whichever layout `config.version` has (`layout`, or `model.layouts.detect_layout` when
    None)."""
    layout = detect_layout(config.version) if layout is None else layout
    if layout in LEGACY_LAYOUTS:
        return load_legacy_backbone(
            config.version,
            layout,
            config.vision_tower,
            config.dtype,
            config.attn_implementation,
            config.use_mm_start_end,
            chain_token=config.chain_token,
            vocabulary=config.vocabulary,
        )
    merged = read_segmenter_config(config.version) if layout is Layout.MERGED else None
    llava = load_llava(config.version, config.dtype, config.attn_implementation)
    tokenizer = load_tokenizer(config.version)
    base_size = len(tokenizer)  # before this run's tokens: the first new id
    token_ids = add_model_tokens(
        tokenizer,
        config.version,
        config.use_mm_start_end,
        merged,
        config.chain_token,
        config.vocabulary,
        family_of(llava.config).image_tokens,
    )
    check_token_ids(config.version, llava, token_ids, merged)
    parts = merged_parts(config.version, merged, config.dtype) if merged else None
    return LoadedBackbone(llava, tokenizer, token_ids, parts, base_size)


def segmentation_tokenizer(
    version: str,
    use_mm_start_end: bool,
    merged: SegmenterFileConfig | None,
    chain_token: str | None = None,
    vocabulary: str = DEFAULT_VOCABULARY,
    image_tokens: ImageTokens = LLAVA_IMAGE_TOKENS,
) -> tuple[PreTrainedTokenizerBase, TokenIds]:
    """A Hugging Face layout's tokenizer (`version`'s) with the segmentation tokens added
    (`add_model_tokens`) and their ids."""
    tokenizer = load_tokenizer(version)
    token_ids = add_model_tokens(
        tokenizer, version, use_mm_start_end, merged, chain_token, vocabulary, image_tokens
    )
    return tokenizer, token_ids


def add_model_tokens(
    tokenizer: PreTrainedTokenizerBase,
    version: str,
    use_mm_start_end: bool,
    merged: SegmenterFileConfig | None,
    chain_token: str | None = None,
    vocabulary: str = DEFAULT_VOCABULARY,
    image_tokens: ImageTokens = LLAVA_IMAGE_TOKENS,
) -> TokenIds:
    """Add the segmentation tokens to `version`'s tokenizer in place (image wrapping as a merged
    checkpoint saved it, else `use_mm_start_end`; the chain token and the vocabulary as a merged
    checkpoint was trained, see `merged_chain_token` and `merged_vocabulary`, else
    `chain_token` and `vocabulary`; the backbone family's `image_tokens`); their ids."""
    wrap = merged.use_mm_start_end if merged else use_mm_start_end
    return add_segmentation_tokens(
        tokenizer,
        wrap,
        strip_whitespace=uses_lisa_tokenization(tokenizer),
        chain_token=merged_chain_token(version, tokenizer, merged, chain_token),
        vocabulary=merged_vocabulary(version, merged, vocabulary),
        image_tokens=image_tokens,
    )


def merged_vocabulary(version: str, merged: SegmenterFileConfig | None, requested: str) -> str:
    """The vocabulary a merged checkpoint was trained with (its `segmenter_config.json`),
    whatever was requested (a warning when another than the default was); else `requested`."""
    vocabulary_for(requested)
    if merged is None:
        return requested
    if requested != merged.vocabulary:
        log = LOGGER.warning if requested != DEFAULT_VOCABULARY else LOGGER.info
        log(
            "%s was trained with the %s vocabulary; --vocabulary %s is ignored",
            version,
            merged.vocabulary,
            requested,
        )
    return merged.vocabulary


def merged_chain_token(
    version: str,
    tokenizer: PreTrainedTokenizerBase,
    merged: SegmenterFileConfig | None,
    requested: str | None,
) -> str | None:
    """The chain token of a merged checkpoint trained with one (its saved `chain` id read back
    through its tokenizer), whatever was requested; else `requested` (fine-tuning a checkpoint
    trained without chaining may add one)."""
    chain_id = merged.ids.chain if merged is not None else None
    if chain_id is None:
        return requested
    trained = tokenizer.convert_ids_to_tokens(chain_id)
    if requested not in (None, trained):
        LOGGER.warning(
            "%s was trained with the chain token %s; --chain_token %s is ignored",
            version,
            trained,
            requested,
        )
    return trained


def check_token_ids(
    version: str, llava, token_ids: TokenIds, merged: SegmenterFileConfig | None
) -> None:
    """The tokenizer's ids must agree with the model config and, for a merged checkpoint, with
    the ids it was trained with (a chain token may be new on a checkpoint trained without)."""
    if token_ids.image != llava.config.image_token_id:
        raise ValueError(
            f"{version}: the tokenizer's <image> id is {token_ids.image} but the model's "
            f"config says image_token_index = {llava.config.image_token_id}"
        )
    if merged is None:
        return
    saved = merged.ids
    if saved.chain is None:
        token_ids = replace(token_ids, chain=None)
    if token_ids != saved:
        raise ValueError(
            f"{version}: the saved tokenizer gives token ids {token_ids.to_dict()} but the "
            f"checkpoint was trained with {merged.token_ids} ({SEGMENTER_CONFIG_FILE})"
        )


def merged_parts(version: str, merged: SegmenterFileConfig, dtype: torch.dtype):
    """SAM, projector and fusion tensors of a merged checkpoint directory."""
    return segmentation_parts(
        read_segmentation_tensors(version), str(version), dtype, merged.sam_decoder_heads
    )
