"""The published checkpoint layouts of a `--version` directory, where their image settings are,
and the LLaVA-v1 / LISA-family ones mapped onto ours.

`detect_layout` tells four layouts apart (REFERENCE.md 3). It runs once per run, at the entry
point (train_ds.py, the merge, `Segmentation.load`, the tools), which hands the `Layout` on to
`model.builder.build_segmenter`, `image_settings_directory` and `read_legacy_checkpoint`:

- `hf-llava`: transformers' `LlavaForConditionalGeneration` directory (config has `text_config`).
- `merged`: our merged checkpoint (`model.checkpoint`: a `segmenter_config.json`).
- `llava-v1`: a LLaVA-v1 base the LISA family trained from (`LLaVA-Lightning-7B-v1-1`,
  `llava-llama-2-13b-chat-lightning-preview`): LLaMA keys plus `model.mm_projector`, one
  Linear(1024 -> H). CLIP is not stored; it comes from `--vision-tower`.
- `lisa`: a merged LISA-family directory (LISA, M2SA, CoReS, LaSagnA): the same plus SAM, the
  projector and M2SA's fusion under `model.visual_model.*` / `model.text_hidden_fcs.*` (config:
  `train_mask_decoder`). Its tokenizer tells what it was trained with: CoReS's chain token
  (`trained_chain_token`), LaSagnA's vocabulary, `<ins>` in place of `[SEG]`
  (`trained_vocabulary`).

The legacy two are read as JSON and tensors (transformers would parse their `model_type "llava"`
config as a LlavaConfig; the tensors come through `model.tensor_files`, which refuses code) and
mapped by `LLAVA_KEY_MAP` onto a `LlavaForConditionalGeneration` built in memory; their
segmentation tensors already have the names of our merged format and go to
`model.checkpoint.segmentation_parts` unchanged. LLaVA-v1's projector is one Linear where
transformers' is Linear -> act -> Linear: it is represented exactly by the activation "linear"
(the identity) and `linear_2` = identity matrix, zero bias, which plain transformers saves and
loads; the price is one H x H matmul per image token.

Tokenization: the LISA family ran transformers 4.31's slow LLaMA tokenizer ("legacy"), which
encodes the text between added tokens as separate SentencePiece pieces, each with its `▁`
prefix, and strips the whitespace around added tokens (`model.tokens`). Legacy tokenizers are
loaded with `legacy=True`, saved with them, so prompts get the ids the checkpoints were trained
on, also after conversion to our formats.

`translate_lisa_family_state_dict` maps training-time state dicts (GSVA `.bin`, LISA's
`zero_to_fp32.py` output: `base_model.model.` prefix, PEFT 0.4 or newer LoRA names, CLIP
included) onto the Segmenter's names, moving the embedding rows of their added tokens to our ids.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from model.backbone import check_attn_implementation, check_model_directory, qwen_vl_family
from model.checkpoint import (
    PROJECTOR_PREFIX,
    SAM_PREFIX,
    SegmentationParts,
    is_merged_checkpoint,
    segmentation_parts,
    split_segmentation_state_dict,
)
from model.sam import convert_original_state_dict
from model.tensor_files import read_tensor_file
from model.tokens import (
    CAT_END_TOKEN,
    CAT_START_TOKEN,
    DEFAULT_VOCABULARY,
    IM_END_TOKEN,
    IM_START_TOKEN,
    INS_TOKEN,
    NO_INS_TOKEN,
    REJ_TOKEN,
    SEG_TOKEN,
    SEMANTIC_TOKEN,
    VOCABULARIES,
    TokenIds,
    add_segmentation_tokens,
    vocabulary_for,
)

LOGGER = logging.getLogger(__name__)
MAX_LISTED_KEYS = 10
CONFIG_FILE = "config.json"
WEIGHT_INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
WEIGHT_SINGLE_FILES = ("pytorch_model.bin", "model.safetensors")
PEFT_PREFIX = "base_model.model."
# The Segmenter's attribute prefixes (model.segmenter.Segmenter)
LLAVA_ATTRIBUTE = "llava."
SAM_ATTRIBUTE = "sam."
PROJECTOR_ATTRIBUTE = "text_hidden_fcs."
FUSION_ATTRIBUTE = "early_fusion."
# LlavaForConditionalGeneration names
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
CLIP_PREFIX = "model.vision_tower."
PROJECTOR_LINEAR_1 = "model.multi_modal_projector.linear_1."
PROJECTOR_LINEAR_2 = "model.multi_modal_projector.linear_2."
LEGACY_PROJECTOR_WEIGHT = "model.mm_projector.weight"
SINGLE_LINEAR_ACT = "linear"  # transformers' ACT2FN["linear"] is the identity

# legacy name (regex, full match) -> LlavaForConditionalGeneration name
LLAVA_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", EMBED_KEY),
    (r"model\.layers\.(\d+\..+)", r"model.language_model.layers.\1"),
    (r"model\.norm\.weight", "model.language_model.norm.weight"),
    (r"lm_head\.weight", LM_HEAD_KEY),
    (r"model\.mm_projector\.(weight|bias)", PROJECTOR_LINEAR_1 + r"\1"),
    (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", CLIP_PREFIX + r"\1"),
)
_KEY_RULES = [(re.compile(pattern), target) for pattern, target in LLAVA_KEY_MAP]
# buffers that older transformers versions saved; recomputed from the config
RECOMPUTED_BUFFERS = re.compile(r".+\.(?:rotary_emb\.inv_freq|embeddings\.position_ids)")
# LLaVA-v1 `mm_vision_select_feature` -> transformers' `vision_feature_select_strategy`
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
LLAMA_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# CoReS's chain token (baoxiaoyi/CoReS train_ds_best.py adds it before [SEG]): a LISA-layout
# directory whose tokenizer holds it was trained with chained decoding
CORES_CHAIN_TOKEN = "[SEG_SEMA]"
# tokens the LISA family appended to the LLaMA vocabulary, in id order (REFERENCE.md 2.1);
# GSVA and CoReS both add four: a run with a chain token reads four added rows as CoReS's.
# LaSagnA (train_ds.py, merge_lora_weights_and_save_hf_model.py) adds its three special
# tokens, then <ins> and <no_ins> as normal tokens, then the image wrapping.
FAMILY_ADDED_TOKENS: dict[str, tuple[str, ...]] = {
    "LISA": (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN),
    "GSVA": (SEG_TOKEN, REJ_TOKEN, IM_START_TOKEN, IM_END_TOKEN),
    "CoReS": (CORES_CHAIN_TOKEN, SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN),
    "LaSagnA": (
        CAT_START_TOKEN,
        CAT_END_TOKEN,
        SEMANTIC_TOKEN,
        INS_TOKEN,
        NO_INS_TOKEN,
        IM_START_TOKEN,
        IM_END_TOKEN,
    ),
}


class Layout(str, Enum):
    """The layouts of a `--version` directory (module docstring)."""

    HF_LLAVA = "hf-llava"
    MERGED = "merged"
    LLAVA_V1 = "llava-v1"
    LISA = "lisa"


LEGACY_LAYOUTS = (Layout.LLAVA_V1, Layout.LISA)


class LoadedBackbone(NamedTuple):
    """A `--version` directory loaded for the builder.

    llava: the backbone (embeddings not yet grown to the tokenizer); tokenizer: with the
    segmentation tokens; token_ids: their ids; parts: the checkpoint's trained SAM, projector
    and fusion, or None when it has none; base_size: the tokenizer's length before this run's
    tokens (the first new id; None: the embedding's row count).
    """

    llava: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    token_ids: TokenIds
    parts: SegmentationParts | None
    base_size: int | None = None


@dataclass
class LegacyCheckpoint:
    """A legacy directory read once: config.json as JSON, tensors under their new names.

    llava_state: LlavaForConditionalGeneration names (CLIP only if stored), stored dtypes;
    segmentation: LISA-format names (`model.visual_model.*`, `model.text_hidden_fcs.*`).
    """

    directory: Path
    layout: Layout
    config: dict
    llava_state: dict[str, Tensor]
    segmentation: dict[str, Tensor]

    @property
    def source(self) -> str:
        return f"{self.directory} ({self.layout.value} layout)"

    @property
    def vocab_rows(self) -> int:
        return self.llava_state[EMBED_KEY].shape[0]

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.llava_state[EMBED_KEY].dtype


def read_config(directory: str | Path) -> dict:
    """config.json as plain JSON (never through transformers' config classes)."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def detect_layout(directory: str | Path) -> Layout:
    """The layout of a `--version` directory; errors name the directory and what is missing."""
    directory = check_model_directory(directory)
    if is_merged_checkpoint(directory):
        return Layout.MERGED
    config = read_config(directory)
    # Qwen-VL directories saved by older transformers keep the text settings at the top level
    if "text_config" in config or qwen_vl_family(config) is not None:
        return Layout.HF_LLAVA
    if "train_mask_decoder" in config:
        return Layout.LISA
    if "mm_hidden_size" in config or "mm_vision_tower" in config:
        return Layout.LLAVA_V1
    raise ValueError(
        f"{directory}: cannot tell the checkpoint layout: config.json has neither `text_config` "
        "(Hugging Face LLaVA) nor a Qwen-VL `model_type` (qwen2_5_vl, qwen3_vl) nor "
        "`mm_hidden_size`/`mm_vision_tower` (LLaVA-v1, LISA family) nor `train_mask_decoder` "
        "(LISA family), and there is no segmenter_config.json"
    )


def image_settings_directory(
    version: str | Path, vision_tower: str | Path | None, layout: Layout
) -> Path:
    """Where `preprocessor_config.json` (CLIP image settings) of `version`, of `layout`
    (`detect_layout`), is: the directory itself, or for the legacy layouts, which keep CLIP
    outside, the `--vision-tower` one."""
    return Path(vision_tower if layout in LEGACY_LAYOUTS else version)


def map_llava_key(key: str) -> str | None:
    """One legacy LLaVA-v1 / LISA name -> its LlavaForConditionalGeneration name, or None."""
    for pattern, target in _KEY_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(target, key)
    return None


def split_legacy_state_dict(
    tensors: dict[str, Tensor], source: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Legacy-named tensors -> (LLaVA tensors under LlavaForConditionalGeneration names,
    segmentation tensors under their LISA-format names). Recomputed buffers are dropped, a
    one-Linear projector gains its identity `linear_2`, and a key that maps nowhere stops
    everything with the first such keys named."""
    llava, segmentation, unmapped = {}, {}, []
    for key, value in tensors.items():
        if RECOMPUTED_BUFFERS.fullmatch(key):
            continue
        if key.startswith((SAM_PREFIX, PROJECTOR_PREFIX)):
            segmentation[key] = value
        elif (mapped := map_llava_key(key)) is not None:
            llava[mapped] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{source}: {len(unmapped)} keys have no place in this model, first "
            f"{sorted(unmapped)[:MAX_LISTED_KEYS]}; nothing was loaded"
        )
    if PROJECTOR_LINEAR_1 + "weight" in llava:
        llava.update(identity_linear_2(llava[PROJECTOR_LINEAR_1 + "weight"]))
    return llava, segmentation


def identity_linear_2(linear_1_weight: Tensor) -> dict[str, Tensor]:
    """The projector's second Linear as the identity: weight I [H, H], bias 0 [H]."""
    hidden, dtype = linear_1_weight.shape[0], linear_1_weight.dtype
    return {
        PROJECTOR_LINEAR_2 + "weight": torch.eye(hidden, dtype=dtype),
        PROJECTOR_LINEAR_2 + "bias": torch.zeros(hidden, dtype=dtype),
    }


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: shards named by an index, or one file."""
    for index in WEIGHT_INDEX_FILES:
        if (directory / index).is_file():
            names = json.loads((directory / index).read_text())["weight_map"].values()
            return [directory / name for name in sorted(set(names))]
    for name in WEIGHT_SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(
        f"{directory}: none of {WEIGHT_INDEX_FILES + WEIGHT_SINGLE_FILES}; no weights to read"
    )


def read_legacy_checkpoint(directory: str | Path, layout: Layout) -> LegacyCheckpoint:
    """Read a LLaVA-v1 or LISA-family directory of the detected `layout`; the layout read is
    LISA when it holds segmentation tensors. Weight files are memory-mapped; errors name the
    file, the layout and the first unmapped keys (an unsafe file: `UnsafeCheckpointError`)."""
    directory = Path(directory)
    config = read_config(directory)
    projector = config.get("mm_projector_type", SINGLE_LINEAR_ACT)
    if projector != SINGLE_LINEAR_ACT:
        raise ValueError(
            f"{directory}: mm_projector_type {projector!r}; the LLaVA-v1 layout has one Linear"
        )
    llava, segmentation = {}, {}
    for path in weight_files(directory):
        file_llava, file_segmentation = split_legacy_state_dict(
            read_tensor_file(path, mmap=True), f"{path} (read as the {layout.value} layout)"
        )
        llava.update(file_llava)
        segmentation.update(file_segmentation)
    if EMBED_KEY not in llava:
        raise ValueError(f"{directory}: no model.embed_tokens.weight; not a LLaVA-v1 checkpoint")
    layout = Layout.LISA if segmentation else Layout.LLAVA_V1
    return LegacyCheckpoint(directory, layout, config, llava, segmentation)


def uses_lisa_tokenization(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for a tokenizer loaded as a legacy (LISA-family) one, or saved from one."""
    return tokenizer.init_kwargs.get("legacy") is True


def wraps_image(checkpoint: LegacyCheckpoint, requested: bool) -> bool:
    """`<im_start>`/`<im_end>` around the image: as trained for a LISA-family checkpoint (its
    config), as requested (`--use_mm_start_end`) for a base the training starts from."""
    if checkpoint.layout is Layout.LISA:
        return bool(checkpoint.config.get("mm_use_im_start_end", requested))
    return requested


def load_legacy_tokenizer(checkpoint: LegacyCheckpoint) -> PreTrainedTokenizerBase:
    """The directory's LLaMA tokenizer with LISA-family tokenization. For a LISA checkpoint its
    tokens must cover every embedding row, so `[SEG]` etc. keep the ids they were trained at."""
    # Not AutoTokenizer: for a `model_type "llava"` config it converts tokenizer.model with a
    # generic converter that drops SentencePiece's "▁" prefix ("A chat" -> "A", not "▁A").
    tokenizer = LlamaTokenizer.from_pretrained(
        checkpoint.directory, padding_side="right", legacy=True, trust_remote_code=False
    )
    tokenizer.init_kwargs["legacy"] = True  # saved with it: copies tokenize the same way
    if checkpoint.layout is not Layout.LISA:
        return tokenizer
    vocabulary = vocabulary_for(published_vocabulary(tokenizer, checkpoint.source))
    trained = [*vocabulary.extras, vocabulary.seg] + (
        [IM_START_TOKEN, IM_END_TOKEN] if wraps_image(checkpoint, True) else []
    )
    absent = [token for token in trained if token not in tokenizer.get_vocab()]
    if absent or len(tokenizer) != checkpoint.vocab_rows:
        raise ValueError(
            f"{checkpoint.source}: its tokenizer has {len(tokenizer)} tokens (lacking {absent}) "
            f"but the embeddings have {checkpoint.vocab_rows} rows, so the ids "
            f"{', '.join(trained)} were trained at cannot be known; keep the tokenizer files "
            "the checkpoint was released with in its directory"
        )
    return tokenizer


def published_vocabulary(tokenizer: PreTrainedTokenizerBase, source: str) -> str:
    """The vocabulary whose seg token a LISA-layout directory's tokenizer holds (LISA's `[SEG]`,
    LaSagnA's `<ins>`); the default when it holds none (its tokenizer check then fails)."""
    vocab = tokenizer.get_vocab()
    held = [name for name, vocabulary in VOCABULARIES.items() if vocabulary.seg in vocab]
    if len(held) > 1:
        raise ValueError(
            f"{source}: its tokenizer holds the seg tokens of the vocabularies {held}; a "
            "checkpoint is trained with one"
        )
    return held[0] if held else DEFAULT_VOCABULARY


def load_vision_tower(path: str | None, named: str | None) -> tuple[CLIPVisionConfig, dict]:
    """CLIP from a local directory (CLIPModel or CLIPVisionModel): (its vision config, its
    tensors under LlavaForConditionalGeneration names). Strict: missing weights stop."""
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(
            f"--vision-tower {path!r} is not a local directory. LLaVA-v1 and LISA-family "
            f"checkpoints keep CLIP outside (theirs names {named!r}): pass the directory of "
            "that CLIP model, e.g. --vision-tower ./clip-vit-large-patch14 (nothing is downloaded)"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel directory's text tower is left out by design
    try:
        tower, info = CLIPVisionModel.from_pretrained(
            path, output_loading_info=True, trust_remote_code=False
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"--vision-tower {path}: not a complete CLIP vision tower: missing "
            f"{sorted(info['missing_keys'])[:MAX_LISTED_KEYS]}, mismatched "
            f"{sorted(info['mismatched_keys'])[:MAX_LISTED_KEYS]}"
        )
    if named and Path(named).name != Path(path).resolve().name:
        LOGGER.warning("--vision-tower %s: the checkpoint was trained with %s", path, named)
    return tower.config, {CLIP_PREFIX + key: value for key, value in tower.state_dict().items()}


def legacy_llava_config(
    config: dict, vision_config: CLIPVisionConfig, image_token_id: int, vocab_size: int
) -> LlavaConfig:
    """LlavaConfig equivalent to a LLaVA-v1 config.json (LLaMA fields copied, CLIP feature
    layer and CLS handling translated, one-Linear projector)."""
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_STRATEGIES:
        raise ValueError(
            f"mm_vision_select_feature {feature!r} unknown ({list(SELECT_STRATEGIES)})"
        )
    text = LlamaConfig(
        **{name: config[name] for name in LLAMA_CONFIG_FIELDS if name in config},
        vocab_size=vocab_size,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_STRATEGIES[feature],
        projector_hidden_act=SINGLE_LINEAR_ACT,
        multimodal_projector_bias=True,
    )


def _tower_name(config: dict) -> str | None:
    return config.get("mm_vision_tower") or config.get("vision_tower")


def check_against(
    state: dict[str, Tensor], expected: dict[str, Tensor], source: str, hint: str = ""
) -> None:
    """Keys and shapes of `state` must equal `expected`'s; the error lists what differs."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key} {tuple(state[key].shape)} (model {tuple(expected[key].shape)})"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source}: {len(missing)} missing keys {missing[:MAX_LISTED_KEYS]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:MAX_LISTED_KEYS]}, "
            f"{len(shapes)} shape mismatches {shapes[:MAX_LISTED_KEYS]}{hint}"
        )


def build_legacy_llava(
    checkpoint: LegacyCheckpoint,
    vision_tower: str | None,
    image_token_id: int,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """The checkpoint's LLaVA with CLIP from `vision_tower`, in `dtype`, eval mode; every
    parameter comes from the files (checked on a meta-device model before loading)."""
    vision_config, clip_state = load_vision_tower(vision_tower, _tower_name(checkpoint.config))
    state = {**clip_state, **checkpoint.llava_state}  # stored CLIP (rare) wins
    config = legacy_llava_config(
        checkpoint.config, vision_config, image_token_id, checkpoint.vocab_rows
    )
    with torch.device("meta"):
        expected = LlavaForConditionalGeneration(config).state_dict()
    check_against(state, expected, f"{checkpoint.source} with --vision-tower {vision_tower}")
    llava = LlavaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=dtype,
        attn_implementation=check_attn_implementation(attn_implementation),
    )
    return llava.eval()


def trained_chain_token(
    checkpoint: LegacyCheckpoint, tokenizer: PreTrainedTokenizerBase, requested: str | None
) -> str | None:
    """The chain token: CoReS's for a LISA-layout directory whose tokenizer holds it (as
    trained, whatever was requested), else as requested (`--chain_token`)."""
    trained = checkpoint.layout is Layout.LISA and CORES_CHAIN_TOKEN in tokenizer.get_vocab()
    if trained and requested not in (None, CORES_CHAIN_TOKEN):
        LOGGER.warning(
            "%s was trained with the chain token %s; --chain_token %s is ignored",
            checkpoint.source,
            CORES_CHAIN_TOKEN,
            requested,
        )
    return CORES_CHAIN_TOKEN if trained else requested


def trained_vocabulary(
    checkpoint: LegacyCheckpoint, tokenizer: PreTrainedTokenizerBase, requested: str
) -> str:
    """The vocabulary: as trained for a LISA-layout directory (`published_vocabulary`: LaSagnA's
    when its tokenizer holds `<ins>`), whatever was requested; else `requested`."""
    vocabulary_for(requested)
    if checkpoint.layout is not Layout.LISA:
        return requested
    trained = published_vocabulary(tokenizer, checkpoint.source)
    if requested not in (DEFAULT_VOCABULARY, trained):
        LOGGER.warning(
            "%s was trained with the %s vocabulary; --vocabulary %s is ignored",
            checkpoint.source,
            trained,
            requested,
        )
    return trained


def legacy_segmentation_tokenizer(
    checkpoint: LegacyCheckpoint,
    use_mm_start_end: bool,
    chain_token: str | None = None,
    vocabulary: str = DEFAULT_VOCABULARY,
) -> tuple[PreTrainedTokenizerBase, TokenIds]:
    """The checkpoint's tokenizer with the segmentation tokens added as its model was trained
    (image wrapping as saved; LISA's 4.31 whitespace handling; CoReS's chain token and
    LaSagnA's vocabulary when it holds them, see `trained_chain_token`, `trained_vocabulary`)
    and their ids."""
    tokenizer = load_legacy_tokenizer(checkpoint)
    token_ids = add_segmentation_tokens(
        tokenizer,
        wraps_image(checkpoint, use_mm_start_end),
        strip_whitespace=True,
        chain_token=trained_chain_token(checkpoint, tokenizer, chain_token),
        vocabulary=trained_vocabulary(checkpoint, tokenizer, vocabulary),
    )
    return tokenizer, token_ids


def load_legacy_backbone(
    version: str | Path,
    layout: Layout,
    vision_tower: str | None,
    dtype: torch.dtype,
    attn_implementation: str,
    use_mm_start_end: bool,
    chain_token: str | None = None,
    vocabulary: str = DEFAULT_VOCABULARY,
) -> LoadedBackbone:
    """A LLaVA-v1 or LISA-family directory of the detected `layout` as the builder needs it
    (see LoadedBackbone); `chain_token` and `vocabulary` as requested (`trained_chain_token`,
    `trained_vocabulary`)."""
    checkpoint = read_legacy_checkpoint(version, layout)
    tokenizer, token_ids = legacy_segmentation_tokenizer(
        checkpoint, use_mm_start_end, chain_token, vocabulary
    )
    llava = build_legacy_llava(
        checkpoint, vision_tower, token_ids.image, dtype, attn_implementation
    )
    parts = (
        segmentation_parts(checkpoint.segmentation, checkpoint.source, dtype)
        if checkpoint.segmentation
        else None
    )
    LOGGER.info("read %s", checkpoint.source)
    return LoadedBackbone(llava, tokenizer, token_ids, parts)


def is_lisa_family_state_dict(state: dict[str, Tensor]) -> bool:
    """True for LISA/GSVA/M2SA training-time names (PEFT prefix, or the LISA-format
    segmentation names without it); the Segmenter's own names never match."""
    return any(key.startswith((PEFT_PREFIX, SAM_PREFIX, PROJECTOR_PREFIX)) for key in state)


def remap_token_rows(matrix: Tensor, current: Tensor, token_ids: TokenIds, source: str) -> Tensor:
    """Embedding or LM-head rows of a LISA-family checkpoint -> our vocabulary.

    matrix: [V_ckpt, H], the base vocabulary then the family's added tokens
    (FAMILY_ADDED_TOKENS, told apart by their count; four are CoReS's when the model has a
    chain token, else GSVA's); current: [V, H], the model's rows, kept for tokens the checkpoint
    lacks (`<image>`; `[REJ]` for LISA and CoReS). Returns [V, H].

    LaSagnA over a LLaVA-v1 base with the lasagna vocabulary: its three special tokens were
    added first, as `add_segmentation_tokens` adds them, so they sit at the same ids below the
    role tokens and are copied in place with the base vocabulary; its remaining four rows are
    read as the roles (`<ins>` = seg, `<no_ins>` = rej, then the image wrapping) as GSVA's are.
    Over a base whose tokenizer already holds `<image>` its seven rows are an error.
    """
    ours = {
        SEG_TOKEN: token_ids.seg,
        REJ_TOKEN: token_ids.rej,
        IM_START_TOKEN: token_ids.im_start,
        IM_END_TOKEN: token_ids.im_end,
        CORES_CHAIN_TOKEN: token_ids.chain,
    }
    base = min(i for i in (*ours.values(), token_ids.image) if i is not None)
    added = matrix.shape[0] - base
    families = [n for n, tokens in FAMILY_ADDED_TOKENS.items() if len(tokens) == added]
    chained = [n for n in families if CORES_CHAIN_TOKEN in FAMILY_ADDED_TOKENS[n]]
    unchained = [n for n in families if n not in chained]
    preferred = chained + unchained if token_ids.chain is not None else unchained
    family = preferred[0] if preferred else None
    if family is None or matrix.shape[1] != current.shape[1]:
        raise ValueError(
            f"{source}: embedding rows {tuple(matrix.shape)} against the model's "
            f"{tuple(current.shape)}: {added} rows past the base vocabulary of {base}, where "
            f"the LISA family adds {FAMILY_ADDED_TOKENS}"
        )
    if absent := [token for token in FAMILY_ADDED_TOKENS[family] if ours.get(token) is None]:
        raise ValueError(
            f"{source}: trained with {absent}; build with --use_mm_start_end (and "
            f"--chain_token {CORES_CHAIN_TOKEN} for CoReS; a LaSagnA training-time state dict "
            "is read once merged by LaSagnA's merge_lora_weights_and_save_hf_model.py, as "
            "--version)"
        )
    rows = current.detach().to(matrix.dtype).clone()
    rows[:base] = matrix[:base]
    for offset, token in enumerate(FAMILY_ADDED_TOKENS[family]):
        rows[ours[token]] = matrix[base + offset]
    return rows


def _lora_base_name(key: str, expected: dict[str, Tensor]) -> str:
    """PEFT 0.4 kept a LoRA layer's base weight at `q_proj.weight`; newer PEFT (and this model)
    at `q_proj.base_layer.weight`."""
    stem, _, leaf = key.rpartition(".")
    renamed = f"{stem}.base_layer.{leaf}"
    return renamed if key not in expected and renamed in expected else key


def _segmentation_names(segmentation: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """LISA-format SAM / projector / fusion tensors -> the Segmenter's names."""
    sam, projector, fusion = split_segmentation_state_dict(segmentation, source)
    try:
        sam = convert_original_state_dict(sam) if sam else {}
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    renamed = {SAM_ATTRIBUTE + key: value for key, value in sam.items()}
    renamed.update({PROJECTOR_ATTRIBUTE + key: value for key, value in projector.items()})
    renamed.update({FUSION_ATTRIBUTE + key: value for key, value in fusion.items()})
    return renamed


def translate_lisa_family_state_dict(
    state: dict[str, Tensor], model: nn.Module, source: str
) -> dict[str, Tensor]:
    """A LISA/GSVA/M2SA training-time state dict -> the Segmenter's complete state dict.

    Only CLIP may be absent (kept from `--vision-tower`: it is frozen); anything else missing,
    unexpected or of another shape is an error naming the keys.
    """
    expected = model.state_dict()
    stripped = {key.removeprefix(PEFT_PREFIX): value for key, value in state.items()}
    if (
        LEGACY_PROJECTOR_WEIGHT in stripped
        and model.llava.config.projector_hidden_act != SINGLE_LINEAR_ACT
    ):
        raise ValueError(
            f"{source}: its mm_projector is one Linear (LLaVA-v1) but --version has a "
            f"{model.llava.config.projector_hidden_act} MLP projector; use the LLaVA-v1 base"
        )
    llava, segmentation = split_legacy_state_dict(stripped, source)
    translated = {
        _lora_base_name(LLAVA_ATTRIBUTE + key, expected): value for key, value in llava.items()
    }
    translated.update(_segmentation_names(segmentation, source))
    for key in (LLAVA_ATTRIBUTE + EMBED_KEY, LLAVA_ATTRIBUTE + LM_HEAD_KEY):
        if key in translated and key in expected:
            translated[key] = remap_token_rows(
                translated[key], expected[key], model.token_ids, source
            )
    clip = [k for k in expected if k.startswith(LLAVA_ATTRIBUTE + CLIP_PREFIX)]
    if not any(key in translated for key in clip):
        LOGGER.info("%s holds no CLIP weights; keeping those of --vision-tower", source)
        translated.update({key: expected[key] for key in clip})
    check_against(
        translated,
        expected,
        f"{source} (read as LISA-family training-time names) against the model built from "
        "--version",
        "; check --lora_r, --lora_target_modules, --early_fusion and --version against the "
        "training run (the default m2sa recipe turns early fusion on: --recipe lisa|gsva or "
        "--no-early_fusion turn it off)",
    )
    return translated
