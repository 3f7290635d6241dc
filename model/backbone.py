"""The multimodal LLM: loading a Hugging Face LLaVA directory and running it on expanded images.

The data pipeline writes one image-token id per image feature into `input_ids` (the count comes
from `image_token_count`, never a literal), so the language model's hidden states align 1:1
with `input_ids`. CLIP and the multimodal projector run once per image; conversations that
share an image reuse its features. Legacy LLaVA-v1 layouts are handled by the compatibility
layer; this module reads the transformers `LlavaForConditionalGeneration` layout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from model.packing import pack, unpack

ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
WEIGHT_FILE_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def check_model_directory(path: str | Path) -> Path:
    """Fail early, naming the directory, when `path` is not a loadable Hugging Face model."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--version {str(path)!r} is not a directory; give a local Hugging Face LLaVA "
            "directory (config.json, weights, tokenizer). Nothing is downloaded."
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
    """Validate `--attn_implementation`; flash-attention needs the optional flash_attn package."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"--attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, not {name!r}"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "--attn_implementation flash_attention_2 needs the optional flash-attn package "
            "(GPU only: pip install flash-attn); use sdpa otherwise"
        )
    return name


def load_llava(
    path: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa"
) -> LlavaForConditionalGeneration:
    """Load a LLaVA directory (weights local, no remote code) in `dtype`."""
    directory = check_model_directory(path)
    return LlavaForConditionalGeneration.from_pretrained(
        directory,
        dtype=dtype,
        attn_implementation=check_attn_implementation(attn_implementation),
        trust_remote_code=False,
    )


def load_tokenizer(path: str | Path):
    """The directory's tokenizer, padded on the right (labels are built for right padding)."""
    return AutoTokenizer.from_pretrained(Path(path), padding_side="right", trust_remote_code=False)


def image_token_count(config: LlavaConfig) -> int:
    """Number of LLM positions one image occupies: (image_size / patch_size)^2 (+1 with CLS)."""
    vision = config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    return count + 1 if config.vision_feature_select_strategy == "full" else count


def resize_embeddings_to_mean(llava: LlavaForConditionalGeneration, vocab_size: int) -> None:
    """Grow the input embeddings and LM head to `vocab_size`; new rows = mean of the old rows."""
    old_size = llava.get_input_embeddings().weight.shape[0]
    if vocab_size == old_size:
        return
    llava.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = {id(m.weight): m.weight for m in (llava.get_input_embeddings(), llava.lm_head)}
    with torch.no_grad():
        for weight in matrices.values():
            weight[old_size:] = weight[:old_size].mean(dim=0, keepdim=True)


# how the rows of tokens a run adds start (`--new_token_rows`): the mean of the old rows, or
# N(0, initializer_range) as transformers 4.31's resize_token_embeddings drew them for LISA,
# GSVA and MMR
NEW_TOKEN_ROWS = ("mean", "normal")


def init_new_rows_normal(
    llava: LlavaForConditionalGeneration,
    first_new_id: int,
    generator: torch.Generator | None = None,
) -> None:
    """Redraw the input-embedding and LM-head rows from `first_new_id` on from N(0, std), std =
    the language model's `initializer_range` (transformers 4.31 `_init_weights`, which
    `resize_token_embeddings` applied to the new rows in the LISA-family code)."""
    std = llava.config.text_config.initializer_range
    matrices = {id(m.weight): m.weight for m in (llava.get_input_embeddings(), llava.lm_head)}
    with torch.no_grad():
        for weight in matrices.values():
            rows = weight[first_new_id:]
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
    llava: LlavaForConditionalGeneration, pixel_values: torch.Tensor
) -> torch.Tensor:
    """CLIP + multimodal projector. pixel_values [N, 3, h, w] -> features [N, T, H].

    CLIP is frozen, so autograd records nothing inside it; the projector is recorded only
    when it is trainable.
    """
    outputs = llava.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    return torch.stack(list(outputs.pooler_output))


def language_model_hidden_states(
    llava: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    conversation_features: torch.Tensor,
) -> torch.Tensor:
    """Final-layer hidden states (after the final norm) of each conversation.

    input_ids, attention_mask: [C, L] with T image-token ids per conversation;
    conversation_features: [C, T, H], the image features each conversation sees -> [C, L, H].
    """
    return language_model_step(llava, input_ids, attention_mask, conversation_features)[0]


def packed_language_model_hidden_states(
    llava: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    conversation_features: torch.Tensor,
    pad_id: int,
) -> torch.Tensor:
    """`language_model_hidden_states` with the conversations packed padding-free (model.packing).

    Same arguments and result [C, L, H] (zero at padding positions); pad_id fills row tails.
    """
    packed = pack(input_ids, attention_mask, pad_id, llava.config.text_config._attn_implementation)
    features = conversation_features[packed.order]
    hidden, _ = language_model_step(llava, packed.input_ids, None, features, packed.position_ids)
    return unpack(hidden, packed, *input_ids.shape)


def language_model_step(
    llava: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    conversation_features: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    use_cache: bool = False,
) -> tuple[torch.Tensor, Cache | None]:
    """The language model over new tokens: (hidden states [C, L_new, H], KV cache or None).

    input_ids: [C, L_new]; attention_mask: [C, L_past + L_new] (False on padding), or None for
    packed rows (transformers then starts a new sequence wherever position_ids restart);
    conversation_features: [C, T, H] when input_ids hold image tokens, else None;
    position_ids: [C, L_new] (left-padded rows need them); past_key_values: the cache of the
    L_past earlier tokens, extended in place when `use_cache`.
    """
    encoded = (
        None
        if conversation_features is None
        else {"image": BaseModelOutputWithPooling(pooler_output=list(conversation_features))}
    )
    outputs = llava.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        mm_encoder_outputs=encoded,
        use_cache=use_cache,
    )
    return outputs.last_hidden_state, outputs.past_key_values
