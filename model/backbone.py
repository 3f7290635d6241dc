"""The multimodal LLM: loading a Hugging Face directory of a supported family and running it on
expanded images. Only this module names a family's internals.

Families (`FAMILIES`, picked by config.json's `model_type`): LLaVA (`llava`; the legacy
LLaVA-v1 / LISA layouts reach it through `model.layouts`), Qwen2.5-VL (`qwen2_5_vl`) and
Qwen3-VL (`qwen3_vl`, whose vision tower also feeds DeepStack features to the first language
layers; they travel with the image features, `image_features`). The
data pipeline writes one image-token id per image feature into `input_ids` (LLaVA: a fixed count
from `image_token_count`, never a literal; Qwen-VL: each image's own count, from its patch grid),
so the language model's hidden states align 1:1 with `input_ids`. The vision tower runs once per
image; conversations that share an image reuse its features. Qwen-VL's multimodal rotary
positions (`Family.rope`) are computed per conversation from its image's grid.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from model.packing import loaded_attn_implementation, pack, pack_rope_positions, unpack
from model.tokens import LLAVA_IMAGE_TOKENS, QWEN_VL_IMAGE_TOKENS, ImageTokens

ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Family:
    """A supported multimodal-LLM family.

    model_class: its transformers class (saved and loaded as a Hugging Face directory).
    image_tokens: the tokenizer's strings of the image token and of those around an image.
    rope: multimodal rotary positions (3 x position per token, from each image's grid).
    conv_type: the conversation template of its chat format (`--conv_type`).
    deepstack: the vision tower also hands features of some of its layers to the first layers
        of the language model (Qwen3-VL's DeepStack); an image's features are then
        [1 + D, T, H], the merged output first.
    """

    name: str
    model_class: type[PreTrainedModel]
    image_tokens: ImageTokens
    rope: bool
    conv_type: str
    deepstack: bool = False


LLAVA = Family(
    "llava", LlavaForConditionalGeneration, LLAVA_IMAGE_TOKENS, rope=False, conv_type="llava_v1"
)
QWEN2_5_VL = Family(
    "qwen2_5_vl",
    Qwen2_5_VLForConditionalGeneration,
    QWEN_VL_IMAGE_TOKENS,
    rope=True,
    conv_type="qwen2_vl",
)
QWEN3_VL = Family(
    "qwen3_vl",
    Qwen3VLForConditionalGeneration,
    QWEN_VL_IMAGE_TOKENS,
    rope=True,
    conv_type="qwen3_vl",
    deepstack=True,
)
FAMILIES: dict[str, Family] = {family.name: family for family in (LLAVA, QWEN2_5_VL, QWEN3_VL)}
WEIGHT_FILE_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def check_model_directory(path: str | Path) -> Path:
    """Fail early, naming the directory, when `path` is not a loadable Hugging Face model."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--version {str(path)!r} is not a directory; give a local Hugging Face LLaVA, "
            "Qwen2.5-VL or Qwen3-VL directory (config.json, weights, tokenizer). Nothing is "
            "downloaded."
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json, so this is not a model directory")
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_FILE_GLOBS):
        raise FileNotFoundError(
            f"{directory}: no weights (*.safetensors or pytorch_model*.bin); "
            "the model would be randomly initialised, so loading stops here"
        )
    return directory


def check_attn_implementation(name: str) -> str:
    """Validate `--attn_implementation` (flash-attention needs the optional flash_attn package);
    the name to load the model with (`model.packing.loaded_attn_implementation`: sdpa's packed
    rows attend per conversation)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"--attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, not {name!r}"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "--attn_implementation flash_attention_2 needs the optional flash-attn package "
            "(GPU only: pip install flash-attn); use sdpa otherwise"
        )
    return loaded_attn_implementation(name)


def attention_layout(llava: PreTrainedModel) -> str:
    """The attention implementation the language model was loaded with (what `pack` cuts its
    rows for: `sdpa_varlen` for `--attn_implementation sdpa`)."""
    return llava.config.text_config._attn_implementation


def family_of(config: PretrainedConfig | dict, source: str = "the model") -> Family:
    """The family of a model config (or config.json's dict), by its `model_type`; ValueError
    naming `source` and the supported types otherwise."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not a supported backbone family "
            f"({', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def qwen_vl_family(config: dict) -> Family | None:
    """The family of a config.json dict whose `model_type` is a Qwen-VL one, else None (LLaVA-v1
    and LISA directories say "llava" too, without a Hugging Face layout, so "llava" alone
    decides nothing)."""
    family = FAMILIES.get(config.get("model_type"))
    return family if family is not None and family.rope else None


def directory_family(path: str | Path) -> Family:
    """The family of a Hugging Face model directory, from its config.json."""
    file = Path(path) / CONFIG_FILE
    return family_of(json.loads(file.read_text(encoding="utf-8")), str(file))


def load_llava(
    path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """Load a Hugging Face directory of a supported family (`directory_family`; weights local,
    no remote code) in `dtype`."""
    directory = check_model_directory(path)
    return directory_family(directory).model_class.from_pretrained(
        directory,
        dtype=dtype,
        attn_implementation=check_attn_implementation(attn_implementation),
        trust_remote_code=False,
    )


def load_tokenizer(path: str | Path):
    """The directory's tokenizer, padded on the right (labels are built for right padding)."""
    return AutoTokenizer.from_pretrained(Path(path), padding_side="right", trust_remote_code=False)


def image_token_count(config: PretrainedConfig) -> int | None:
    """Number of LLM positions one image occupies: LLaVA's (image_size / patch_size)^2 (+1 with
    CLS); None for a family whose count follows each image (Qwen-VL, `Family.rope`)."""
    if family_of(config).rope:
        return None
    vision = config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    return count + 1 if config.vision_feature_select_strategy == "full" else count


def resize_embeddings_to_mean(
    llava: PreTrainedModel, vocab_size: int, first_new_id: int | None = None
) -> None:
    """Give the input embeddings and LM head rows for ids up to `vocab_size`; the rows of the
    new ids, `first_new_id` (default: the current row count) to `vocab_size`, = the mean of the
    rows before them. Never shrinks: a vocabulary padded beyond its tokenizer (Qwen-VL's, the
    Hugging Face LLaVA-1.5's) keeps its spare rows, and new tokens take the first of them."""
    rows = llava.get_input_embeddings().weight.shape[0]
    first = rows if first_new_id is None else min(first_new_id, rows)
    if vocab_size > rows:
        llava.resize_token_embeddings(vocab_size, mean_resizing=False)
    if first >= vocab_size:
        return
    matrices = {id(m.weight): m.weight for m in (llava.get_input_embeddings(), llava.lm_head)}
    with torch.no_grad():
        for weight in matrices.values():
            weight[first:vocab_size] = weight[:first].mean(dim=0, keepdim=True)


# how the rows of tokens a run adds start (`--new_token_rows`): the mean of the old rows, or
# N(0, initializer_range) as transformers 4.31's resize_token_embeddings drew them for LISA,
# GSVA and MMR
NEW_TOKEN_ROWS = ("mean", "normal")


def init_new_rows_normal(
    llava: PreTrainedModel,
    first_new_id: int,
    generator: torch.Generator | None = None,
    end: int | None = None,
) -> None:
    """Redraw the input-embedding and LM-head rows from `first_new_id` up to `end` (default: the
    last row) from N(0, std), std = the language model's `initializer_range` (transformers 4.31
    `_init_weights`, which `resize_token_embeddings` applied to the new rows in the LISA-family
    code)."""
    std = llava.config.text_config.initializer_range
    matrices = {id(m.weight): m.weight for m in (llava.get_input_embeddings(), llava.lm_head)}
    with torch.no_grad():
        for weight in matrices.values():
            rows = weight[first_new_id:end]
            draw = torch.empty(rows.shape, dtype=torch.float32).normal_(
                0.0, std, generator=generator
            )
            rows.copy_(draw.to(rows.dtype))


def parse_token_init(text: str) -> dict[str, str]:
    """`--new_token_init` "[SEG]=yes,[REJ]=no" -> {"[SEG]": "yes", "[REJ]": "no"} ("" -> {})."""
    pairs = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        token, sep, word = (piece.strip() for piece in item.partition("="))
        if not sep or not token or not word:
            raise ValueError(
                f"--new_token_init item {item!r} must read TOKEN=WORD, as in '[SEG]=yes,[REJ]=no'"
            )
        pairs[token] = word
    return pairs


def init_new_token_rows(
    llava: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    sources: dict[str, str],
    first_new_id: int,
) -> None:
    """Copy into each new token's input-embedding and LM-head rows those of the first token of
    a word (`sources`: {token: word}), so that the token starts where the word stands: the
    model predicts it where it would predict the word. Only tokens added by this run (id >=
    first_new_id) may be set; ValueError naming the token otherwise, or when a word is unknown.
    """
    for token, word in sources.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or token_id < first_new_id:
            raise ValueError(
                f"--new_token_init names {token!r}, which is not a token this run adds to the "
                f"vocabulary (new ids start at {first_new_id}); a checkpoint's own tokens keep "
                "their trained rows"
            )
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if not pieces or pieces[0] == tokenizer.unk_token_id or pieces[0] >= first_new_id:
            raise ValueError(
                f"--new_token_init: the word {word!r} for {token!r} does not encode to a token "
                f"of the original vocabulary (it gives ids {pieces})"
            )
        with torch.no_grad():
            for matrix in (llava.get_input_embeddings().weight, llava.lm_head.weight):
                matrix[token_id] = matrix[pieces[0]]


def image_features(
    model: PreTrainedModel, pixels: torch.Tensor, grid: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The vision tower and projector (LLaVA: CLIP + multimodal projector; Qwen-VL: its ViT +
    patch merger), once per image -> per image features [T_i, H].

    pixels: LLaVA [N, 3, h, w]; Qwen-VL the flat patches of the N images [sum P_i, D] with
    grid long [N, 3] (t, h, w). With DeepStack (Qwen3-VL) each image's features are
    [1 + D, T_i, H]: the merged output, then the D layers' features. The tower is frozen, so
    autograd records nothing inside it; the projector is recorded only when it is trainable.
    """
    family = family_of(model.config)
    if not family.rope:
        outputs = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        return list(outputs.pooler_output)
    if grid is None:
        raise ValueError("Qwen-VL images need their patch grids (Batch.image_grid)")
    outputs = model.model.get_image_features(pixels, grid, return_dict=True)
    if not family.deepstack:
        return list(outputs.pooler_output)
    layers = outputs.deepstack_features
    return [
        torch.stack([main, *(layer[index] for layer in layers)])
        for index, main in enumerate(outputs.pooler_output)
    ]


def encoder_outputs(
    model: PreTrainedModel, features: list[torch.Tensor]
) -> dict[str, BaseModelOutputWithPooling]:
    """Per-conversation image features as the family's forward takes precomputed ones."""
    if not family_of(model.config).deepstack:
        return {"image": BaseModelOutputWithPooling(pooler_output=list(features))}
    layers = [[feature[index] for feature in features] for index in range(1, len(features[0]))]
    return {
        "image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=[feature[0] for feature in features], deepstack_features=layers
        )
    }


def vision_tower(model: PreTrainedModel) -> nn.Module:
    """The frozen vision encoder (LLaVA's CLIP, Qwen-VL's ViT with its merger)."""
    if family_of(model.config).rope:
        return model.model.visual
    return model.model.vision_tower


def per_conversation(items: list, conv_image: torch.Tensor) -> list:
    """Per-image items (features [T_i, H]) -> one per conversation, by conv_image [C]."""
    return [items[index] for index in conv_image.tolist()]


def rope_positions(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    grids: torch.Tensor,
) -> torch.Tensor:
    """Qwen-VL's multimodal rotary positions long [3, C, L] of right-padded conversations:
    text positions count on from the previous token, an image's tokens take (t, row, column)
    of its grid after them. input_ids, attention_mask: [C, L]; grids: long [C, 3], each
    conversation's image grid."""
    is_image = (input_ids == model.config.image_token_id).int()
    positions, _ = model.model.get_rope_index(
        input_ids, is_image, image_grid_thw=grids, attention_mask=attention_mask
    )
    return positions


def prompt_positions(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    grids: torch.Tensor | None,
) -> torch.Tensor:
    """The positions the language model reads for left-padded prompts: `positions` [C, L] (each
    row counting from its first real token) for LLaVA, the multimodal ones [3, C, L] for Qwen-VL
    (`rope_positions` with `grids` [C, 3])."""
    if not family_of(model.config).rope:
        return positions
    return rope_positions(model, input_ids, attention_mask, grids)


def next_positions(positions: torch.Tensor) -> torch.Tensor:
    """Positions of the token after the last column of `positions` ([C, L] or [3, C, L]): one
    past each row's largest, on every axis -> [C, 1] or [3, C, 1]. Text after an image counts on
    from its largest position, as both families' positions do."""
    last = positions.amax(dim=-1, keepdim=True)
    if positions.dim() == 3:
        last = last.amax(dim=0, keepdim=True).expand(positions.shape[0], -1, -1)
    return last + 1


def language_model_hidden_states(
    llava: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    conversation_features: list[torch.Tensor],
    grids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final-layer hidden states (after the final norm) of each conversation.

    input_ids, attention_mask: [C, L] with T_c image-token ids in conversation c;
    conversation_features: per conversation [T_c, H], the image features it sees; grids:
    long [C, 3], each conversation's image grid (Qwen-VL) -> [C, L, H].
    """
    return language_model_step(
        llava, input_ids, attention_mask, conversation_features, grids=grids
    )[0]


def packed_language_model_hidden_states(
    llava: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    conversation_features: list[torch.Tensor],
    pad_id: int,
    grids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`language_model_hidden_states` with the conversations packed padding-free (model.packing;
    Qwen-VL's multimodal positions computed per conversation, then packed).

    Same arguments and result [C, L, H] (zero at padding positions); pad_id fills row tails.
    """
    packed = pack(input_ids, attention_mask, pad_id, attention_layout(llava))
    features = [conversation_features[index] for index in packed.order.tolist()]
    positions = packed.position_ids
    if family_of(llava.config).rope:
        rope = rope_positions(llava, input_ids, attention_mask, grids)
        positions = pack_rope_positions(rope, packed)
    hidden, _ = language_model_step(
        llava, packed.input_ids, None, features, positions, attention_kwargs=packed.attention_kwargs
    )
    return unpack(hidden, packed, *input_ids.shape)


def language_model_step(
    llava: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    conversation_features: list[torch.Tensor] | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    use_cache: bool = False,
    grids: torch.Tensor | None = None,
    attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, Cache | None]:
    """The language model over new tokens: (hidden states [C, L_new, H], KV cache or None).

    input_ids: [C, L_new]; attention_mask: [C, L_past + L_new] (False on padding), or None for
    packed rows (transformers then starts a new sequence wherever position_ids restart);
    conversation_features: per conversation [T_c, H] when input_ids hold image tokens, else
    None; position_ids: [C, L_new] (left-padded rows need them; Qwen-VL [3, C, L_new], computed
    from `grids` [C, 3] when None); past_key_values: the cache of the L_past earlier tokens,
    extended in place when `use_cache`; attention_kwargs: passed down to the attention function
    (a packed row's `PackedBatch.attention_kwargs`).
    """
    if position_ids is None and family_of(llava.config).rope:
        if grids is None or past_key_values is not None:
            raise ValueError(
                "Qwen-VL needs its multimodal positions: the conversations' image grids for a "
                "first pass, explicit position_ids after it"
            )
        position_ids = rope_positions(llava, input_ids, attention_mask, grids)
    encoded = (
        None if conversation_features is None else encoder_outputs(llava, conversation_features)
    )
    outputs = llava.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        mm_encoder_outputs=encoded,
        use_cache=use_cache,
        **(attention_kwargs or {}),
    )
    return outputs.last_hidden_state, outputs.past_key_values
