"""Our merged checkpoint: a Hugging Face LLaVA directory plus the segmentation parts.

`merge_lora_weights_and_save_hf_model.py` writes it; `--version <dir>` (train_ds.py, chat.py)
reads it with no other weights. Layout of the directory:

    config.json, generation_config.json, model*.safetensors (+ index when sharded)
        the LLaVA, LoRA merged, the segmentation tokens in its vocabulary; plain
        `LlavaForConditionalGeneration.from_pretrained(<dir>)` loads it.
    tokenizer files, preprocessor_config.json
        the tokenizer with the vocabulary's seg/rej tokens (`[SEG]`/`[REJ]`, or LaSagnA's
        `<ins>`/`<no_ins>` and its special tokens) and `<im_start>`/`<im_end>`, the CLIP
        settings.
    segmenter_config.json
        what the segmentation side needs (`SegmenterFileConfig`).
    segmenter*.safetensors (+ segmenter.safetensors.index.json when sharded)
        SAM (or SAM 2), the projector and the fusion module under the LISA-format names
        (REFERENCE.md 3.1): `model.visual_model.<original SAM or SAM 2 key>`,
        `model.visual_model.mask_decoder.compress_vit.*` (M2SA fusion) and
        `model.text_hidden_fcs.0.{0,2}.*`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from torch import Tensor, nn

from model.losses import LossWeights
from model.mask_models import kind_of, mask_model_from_state
from model.tensor_files import read_tensor_files
from model.tokens import DEFAULT_VOCABULARY, TokenIds, vocabulary_name

SEGMENTER_CONFIG_FILE = "segmenter_config.json"
SEGMENTER_WEIGHTS_PATTERN = "segmenter{suffix}.safetensors"
SEGMENTER_INDEX_FILE = "segmenter.safetensors.index.json"
SEGMENTER_SINGLE_FILE = "segmenter.safetensors"
FORMAT_NAME = "reasoning-segmenter"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = "5GB"
MAX_LISTED_KEYS = 10

# LISA-format prefixes of the segmentation parts <-> the Segmenter's own attribute prefixes
SAM_PREFIX = "model.visual_model."
PROJECTOR_PREFIX = "model.text_hidden_fcs."
FUSION_PREFIX = "model.visual_model.mask_decoder.compress_vit."
# copied from the source LLaVA directory when present (image settings, chat template)
COPIED_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class SegmenterFileConfig:
    """`segmenter_config.json`: the segmentation side of a merged checkpoint.

    token_ids: the ids the model was trained with (checked against the saved tokenizer).
    out_dim: projector output width (= SAM prompt width).
    use_mm_start_end: images wrapped in `<im_start>`/`<im_end>` in prompts.
    early_layer: ViT block whose output the M2SA fusion reads (None: no fusion).
    sam_decoder_heads: mask-decoder attention heads (not visible in the weights' shapes).
    conv_type: conversation template of training (prompts must use the same).
    loss_weights: kept so that fine-tuning from this checkpoint starts with them set.
    train_mask_decoder: always True; the LISA-family marker of a segmentation checkpoint.
    provenance: where the weights came from (base --version, --weight, run directory).
    vocabulary: the strings of the seg/rej roles (`model.tokens.VOCABULARIES`); a directory
        written before it was recorded is "lisa".
    """

    token_ids: dict[str, int | None]
    out_dim: int
    use_mm_start_end: bool
    early_layer: int | None
    sam_decoder_heads: int
    conv_type: str
    loss_weights: dict[str, float] = field(default_factory=lambda: asdict(LossWeights()))
    train_mask_decoder: bool = True
    provenance: dict[str, str] = field(default_factory=dict)
    vocabulary: str = DEFAULT_VOCABULARY
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def ids(self) -> TokenIds:
        return TokenIds(**self.token_ids)


def is_merged_checkpoint(directory: str | Path) -> bool:
    """True when `directory` holds our merged format (a `segmenter_config.json`)."""
    return (Path(directory) / SEGMENTER_CONFIG_FILE).is_file()


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer (W <- W + alpha/r * B A) and put the plain
    base layer back in its place. Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    names = [name for name, child in module.named_modules() if isinstance(child, LoraLayer)]
    for name in names:
        layer = module.get_submodule(name)
        layer.merge(safe_merge=True)
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, layer.get_base_layer())
    return len(names)


def segmentation_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The Segmenter's SAM, projector and fusion tensors under their LISA-format names."""
    state = {
        SAM_PREFIX + key: value
        for key, value in kind_of(model.sam).to_original(model.sam.state_dict()).items()
    }
    state.update(
        {PROJECTOR_PREFIX + key: value for key, value in model.text_hidden_fcs.state_dict().items()}
    )
    if model.early_fusion is not None:
        state.update(
            {FUSION_PREFIX + key: value for key, value in model.early_fusion.state_dict().items()}
        )
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def split_segmentation_state_dict(
    state: dict[str, Tensor], source: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """LISA-format segmentation tensors -> (original SAM state, projector state, fusion state),
    each with the prefix removed. Keys outside the three prefixes are an error naming them."""
    sam, projector, fusion, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(FUSION_PREFIX):
            fusion[key.removeprefix(FUSION_PREFIX)] = value
        elif key.startswith(SAM_PREFIX):
            sam[key.removeprefix(SAM_PREFIX)] = value
        elif key.startswith(PROJECTOR_PREFIX):
            projector[key.removeprefix(PROJECTOR_PREFIX)] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} keys outside {SAM_PREFIX!r} and {PROJECTOR_PREFIX!r}: "
            f"{sorted(unknown)[:10]}"
        )
    return sam, projector, fusion


def save_merged(
    model: nn.Module,
    tokenizer,
    directory: str | Path,
    *,
    source_version: str | Path,
    conv_type: str,
    provenance: dict[str, str] | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a Segmenter whose LoRA is already merged (`merge_lora`) as our merged format.

    source_version: the LLaVA directory it was built from (its image-processor settings and
    chat template are copied). Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    llava = model.llava
    llava.config.use_cache = True
    llava.save_pretrained(directory, max_shard_size=max_shard_size)
    _write_generation_config(llava, model.token_ids, directory)
    tokenizer.save_pretrained(directory)
    for name in COPIED_FILES:
        if (Path(source_version) / name).is_file():
            (directory / name).write_bytes((Path(source_version) / name).read_bytes())
    save_torch_state_dict(
        segmentation_state_dict(model),
        directory,
        filename_pattern=SEGMENTER_WEIGHTS_PATTERN,
        max_shard_size=max_shard_size,
    )
    file_config = SegmenterFileConfig(
        token_ids=model.token_ids.to_dict(),
        out_dim=model.text_hidden_fcs[0][-1].out_features,
        use_mm_start_end=model.token_ids.im_start is not None,
        early_layer=model.early_layer,
        sam_decoder_heads=kind_of(model.sam).decoder_heads(model.sam),
        conv_type=conv_type,
        loss_weights=asdict(model.loss_weights),
        provenance=dict(provenance or {}),
        vocabulary=vocabulary_name(tokenizer, model.token_ids),
    )
    (directory / SEGMENTER_CONFIG_FILE).write_text(json.dumps(asdict(file_config), indent=2))
    return directory


def _write_generation_config(llava: nn.Module, token_ids: TokenIds, directory: Path) -> None:
    """Greedy decoding up to 512 new tokens (LISA's chat setting), our eos/pad/bos ids."""
    from transformers import GenerationConfig

    GenerationConfig(
        do_sample=False,
        max_new_tokens=512,
        bos_token_id=token_ids.bos,
        eos_token_id=token_ids.eos,
        pad_token_id=token_ids.pad,
    ).save_pretrained(directory)


def read_segmenter_config(directory: str | Path) -> SegmenterFileConfig:
    """`segmenter_config.json` of a merged checkpoint, checked for format and version."""
    path = Path(directory) / SEGMENTER_CONFIG_FILE
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}; "
            f"this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return SegmenterFileConfig(**data)


def read_segmentation_tensors(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of `segmenter*.safetensors` (single file or sharded with an index)."""
    directory = Path(directory)
    index = directory / SEGMENTER_INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SEGMENTER_SINGLE_FILE).is_file():
        files = [SEGMENTER_SINGLE_FILE]
    else:
        raise FileNotFoundError(
            f"{directory}: {SEGMENTER_CONFIG_FILE} is present but neither {SEGMENTER_SINGLE_FILE} "
            f"nor {SEGMENTER_INDEX_FILE}; the segmentation weights are missing"
        )
    return read_tensor_files(directory / name for name in files)


@dataclass
class SegmentationParts:
    """The segmentation side of a checkpoint, ready to assemble into a Segmenter.

    sam: the SamModel (trained decoder included). projector, fusion: state dicts of
    `text_hidden_fcs` (keys `0.0.weight`, ...) and of the fusion module (empty without fusion).
    """

    sam: nn.Module
    projector: dict[str, Tensor]
    fusion: dict[str, Tensor]


def segmentation_parts(
    state: dict[str, Tensor], source: str, dtype: torch.dtype, decoder_heads: int | None = None
) -> SegmentationParts:
    """Build SAM or SAM 2 (by its keys) from LISA-format segmentation tensors and split off
    projector and fusion."""
    sam_state, projector, fusion = split_segmentation_state_dict(state, source)
    sam = mask_model_from_state(sam_state, source, dtype, decoder_heads)
    return SegmentationParts(sam, projector, fusion)


def load_into(
    module: nn.Module, state: dict[str, Tensor], source: str, prefix: str = "", hint: str = ""
) -> None:
    """Strictly load `state` into `module` (cast to its dtypes). A mismatch raises ValueError
    naming `source`, the counts and the first missing and unexpected keys (with `prefix`),
    then `hint` (what to check)."""
    expected = module.state_dict()
    missing = sorted(prefix + key for key in set(expected) - set(state))
    unexpected = sorted(prefix + key for key in set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: {len(missing)} missing keys {missing[:MAX_LISTED_KEYS]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:MAX_LISTED_KEYS]}{hint}"
        )
    module.load_state_dict(
        {key: value.to(expected[key].dtype) for key, value in state.items()}, strict=True
    )
