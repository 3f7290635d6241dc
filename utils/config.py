"""train_ds.py's command line (the flags: `utils.flags`) resolved into one typed `TrainConfig`.

This is the only place that reads LISA's string formats ("sem_seg||refer_seg", "9,3,3,1",
"q_proj,v_proj") into typed values.

Three layers decide each field, the later winning: the built-in default of its flag, the recipe
(`--recipe NAME|PATH`, `utils.recipes`; without one the `m2sa` recipe, so the MMR README's
command trains M2SA as its README says), and the flags given on the command line.
`resolve_config` also says where each field came from (`--print_config`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.backbone import parse_token_init
from model.builder import ModelConfig
from model.lora import TRAINABLE_GROUPS
from model.losses import LossWeights
from utils.datasets.base import SamplingOptions
from utils.datasets.custom import FAMILY as CUSTOM_FAMILY
from utils.datasets.custom import check_custom_entries
from utils.datasets.mixer import (
    FAMILY_BUILDERS,
    DataConfig,
    check_rates,
    check_single_source,
)
from utils.datasets.templates import CORES_CHAIN_TOKEN, CORES_STYLE, val_answer_problem
from utils.datasets.validation import gsva_epoch_validation, parse_val_datasets
from utils.flags import USAGE_ERROR, build_parser, explicit_flags
from utils.recipes import DEFAULT_RECIPE, Recipe, RecipeError, load_recipe

LOGGER = logging.getLogger(__name__)
# GSVA flags accepted for command-line compatibility but without effect here
IGNORED_FLAGS = ("merge_lora_path",)
# where a field's value came from (`ResolvedConfig.sources`)
FROM_DEFAULT, FROM_RECIPE, FROM_COMMAND_LINE = "default", "recipe", "command line"


@dataclass(frozen=True)
class TrainConfig:
    """Every train_ds.py setting; see `utils.flags.build_parser` for each flag's help."""

    local_rank: int
    version: str
    vis_save_path: str
    precision: str
    image_size: int
    model_max_length: int
    lora_r: int
    vision_tower: str
    load_in_8bit: bool
    load_in_4bit: bool
    dataset: str
    sample_rates: str
    sem_seg_data: str
    refer_seg_data: str
    vqa_data: str
    reason_seg_data: str
    multi_part_reason_seg_data: str
    custom_data: str
    lasagna_sem_seg_data: str
    val_dataset: str
    val_json_name: str
    val_answer: str
    dataset_dir: str
    log_base_dir: str
    exp_name: str
    epochs: int
    steps_per_epoch: int
    batch_size: int
    grad_accumulation_steps: int
    val_batch_size: int
    workers: int
    lr: float
    group_lr: str
    ce_loss_weight: float
    dice_loss_weight: float
    bce_loss_weight: float
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str
    new_token_init: str
    new_token_rows: str
    explanatory: float
    beta1: float
    beta2: float
    num_classes_per_sample: int
    num_classes_per_question: int
    num_all_classes: int
    use_expand_question_list: bool
    prompt_style: str
    ignore_pixels: str
    part_targets: str
    mmr_pairing: str
    no_target_answer: str
    refer_draw: str
    gsva_answer_form: str
    too_long: str
    exclude_val: bool
    skip_bad_samples: bool
    no_eval: bool
    eval_only: bool
    eval_steps: int
    eval_protocol: str
    max_new_tokens: int
    lasagna_miou_compat: bool
    semantic_val_chunk: int
    vision_pretrained: str
    out_dim: int | None
    resume: str
    weight: str
    print_freq: int
    start_epoch: int
    gradient_checkpointing: bool
    train_mask_decoder: bool
    train_mm_projector: bool
    use_mm_start_end: bool
    auto_resume: bool
    conv_type: str
    early_fusion: bool
    chain_token: str
    vocabulary: str
    supervise_coarse: bool
    seed: int
    zero_stage: int
    offload_optimizer: bool
    attn_implementation: str
    no_sampling: bool
    val_refzom: bool
    merge_lora_path: str
    warmup_steps: int
    recipe: str
    print_config: bool
    force_unlock: bool
    full_logits: bool
    packing: bool | None
    estimate_memory: bool
    gpu_memory_gb: float
    estimate_gpus: int
    min_pixels: int | None
    max_pixels: int | None

    @property
    def log_dir(self) -> Path:
        return Path(self.log_base_dir) / self.exp_name

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(name for name in self.dataset.split("||") if name)

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(float(rate) for rate in self.sample_rates.split(",") if rate.strip())

    @property
    def group_lrs(self) -> dict[str, float]:
        """`--group_lr` as {trainable group: learning rate}; ValueError naming the bad entry."""
        return parse_group_lr(self.group_lr)

    def family_data(self) -> dict[str, tuple[str, ...]]:
        """`--<family>_data` split on "||" for every family of `--dataset`."""
        return {
            family: tuple(n for n in getattr(self, f"{family}_data", "").split("||") if n)
            for family in self.datasets
        }

    def sampling_options(self) -> SamplingOptions:
        return SamplingOptions(
            num_classes_per_sample=self.num_classes_per_sample,
            num_classes_per_question=self.num_classes_per_question,
            use_expand_question_list=self.use_expand_question_list,
            prompt_style=self.prompt_style,
            explanatory=self.explanatory,
            exclude_val=self.exclude_val,
            ignore_pixels=self.ignore_pixels,
            part_targets=self.part_targets,
            mmr_pairing=self.mmr_pairing,
            no_target_answer=self.no_target_answer,
            refer_draw=self.refer_draw,
            gsva_answer_form=self.gsva_answer_form,
        )

    def data_config(self) -> DataConfig:
        return DataConfig(
            dataset_dir=Path(self.dataset_dir),
            dataset=self.datasets,
            sample_rates=self.rates,
            family_data=self.family_data(),
            options=self.sampling_options(),
            seed=self.seed,
            num_all_classes=self.num_all_classes,
        )

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            version=self.version,
            vision_pretrained=self.vision_pretrained,
            vision_tower=self.vision_tower,
            precision=self.precision,
            attn_implementation=self.attn_implementation,
            gradient_checkpointing=self.gradient_checkpointing,
            use_mm_start_end=self.use_mm_start_end,
            out_dim=self.out_dim,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_target_modules=tuple(
                name.strip() for name in self.lora_target_modules.split(",") if name.strip()
            ),
            train_mask_decoder=self.train_mask_decoder,
            train_mm_projector=self.train_mm_projector,
            early_fusion=self.early_fusion,
            chain_token=self.chain_token or None,
            vocabulary=self.vocabulary,
            supervise_coarse=self.supervise_coarse,
            new_token_init=tuple(parse_token_init(self.new_token_init).items()),
            new_token_rows=self.new_token_rows,
            loss_weights=LossWeights(
                ce_loss_weight=self.ce_loss_weight,
                bce_loss_weight=self.bce_loss_weight,
                dice_loss_weight=self.dice_loss_weight,
            ),
        )


@dataclass(frozen=True)
class ResolvedConfig:
    """A TrainConfig with its recipe and, per field, where its value came from
    (FROM_DEFAULT, FROM_RECIPE or FROM_COMMAND_LINE)."""

    config: TrainConfig
    recipe: Recipe
    sources: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """Every field, plus "recipe_file" and the "sources" map (`--print_config`)."""
        return {
            **asdict(self.config),
            "recipe_file": str(self.recipe.path),
            "sources": self.sources,
        }


def layered_values(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[dict[str, Any], Recipe, dict[str, str]]:
    """(values, recipe, sources): the parser's defaults, overridden by the recipe named on the
    command line (or DEFAULT_RECIPE), overridden by the flags given. RecipeError for a bad
    recipe."""
    values = vars(parser.parse_args(argv))
    given = explicit_flags(parser, argv)
    recipe = load_recipe(str(given.get("recipe") or DEFAULT_RECIPE), parser)
    sources = dict.fromkeys(values, FROM_DEFAULT)
    for layer, source in ((recipe.values, FROM_RECIPE), (given, FROM_COMMAND_LINE)):
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    values["recipe"] = recipe.name
    if values["val_refzom"]:
        values["val_dataset"] = with_refzom_validation(values["val_dataset"])
        sources["val_dataset"] = FROM_COMMAND_LINE
    return values, recipe, sources


def with_refzom_validation(val_dataset: str) -> str:
    """GSVA's `--val_refzom`: its per-epoch GRES evaluation runs on RefZOM's test split instead
    of gRefCOCO val. Here: "grefcoco|unc|val" in `val_dataset` is replaced by
    "refzom|final|test", which is added when there is nothing to replace."""
    entries = [entry for entry in val_dataset.split("||") if entry]
    gres, refzom = gsva_epoch_validation(False), gsva_epoch_validation(True)
    replaced = [refzom if entry == gres else entry for entry in entries]
    return "||".join(replaced if gres in entries else [*entries, refzom])


def resolve_config(
    argv: list[str] | None = None, check_data_flags: bool = True, prog: str | None = None
) -> ResolvedConfig:
    """Parse a train_ds.py command line (last of repeated flags wins) over its recipe; a bad
    recipe, or (with `check_data_flags`) data flags that disagree, exit with one line and
    argparse's usage status, naming `prog` (default: the running script)."""
    parser = build_parser()
    parser.prog = prog or parser.prog
    try:
        values, recipe, sources = layered_values(parser, argv)
    except RecipeError as error:
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {error}\n")
    for flag in IGNORED_FLAGS:
        if values[flag]:
            LOGGER.warning("--%s is accepted for compatibility and has no effect", flag)
    config = TrainConfig(**values)
    problem = data_flag_problem(config) if check_data_flags else None
    if problem:
        # parser.error's 50-line usage would bury the one line that matters
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {problem}\n")
    return ResolvedConfig(config, recipe, sources)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a train_ds.py command line (see `resolve_config`)."""
    return resolve_config(argv).config


def chain_token_problem(config: TrainConfig) -> str | None:
    """What is wrong with `--chain_token` beside the answers a run writes, or None. Training:
    `--prompt_style cores` writes `[SEG_SEMA]`, which is one token only as the chain token
    (else the tokenizer splits it into word pieces), and a chain token must appear in the
    training answers (only "cores" answers, or the user's own custom files, can hold one).
    Validation: `--val_answer` as `templates.val_answer_problem` says. `--supervise_coarse`
    needs a chain token."""
    chain = config.chain_token
    if config.supervise_coarse and not chain:
        return "--supervise_coarse supervises the chain token's masks: it needs --chain_token"
    if not config.eval_only:
        if config.prompt_style == CORES_STYLE and chain != CORES_CHAIN_TOKEN:
            return (
                f"--prompt_style {CORES_STYLE} writes CoReS's answers, which hold "
                f"{CORES_CHAIN_TOKEN}: pass --chain_token {CORES_CHAIN_TOKEN} (now {chain!r})"
            )
        if chain and config.prompt_style != CORES_STYLE and CUSTOM_FAMILY not in config.datasets:
            return (
                f"--chain_token {chain}: no training answer holds it; --prompt_style "
                f"{CORES_STYLE} writes {CORES_CHAIN_TOKEN} (or write it in --custom_data answers)"
            )
    if config.eval_only or not config.no_eval:
        return val_answer_problem(config.val_answer, chain)
    return None


def parse_group_lr(text: str) -> dict[str, float]:
    """`--group_lr`'s "lora=2e-4,lm_head=2e-4" -> {"lora": 2e-4, "lm_head": 2e-4}; ValueError
    naming the entry that is not GROUP=LR with a trainable group (`model.lora.TRAINABLE_GROUPS`)
    and a positive rate, or a group named twice."""
    rates: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        group, _, value = entry.partition("=")
        group = group.strip()
        if group not in TRAINABLE_GROUPS:
            raise ValueError(
                f"--group_lr entry {entry!r}: {group!r} is not a trainable group; "
                f"choose from {', '.join(TRAINABLE_GROUPS)}"
            )
        try:
            rate = float(value)
        except ValueError:
            message = f"--group_lr entry {entry!r}: expected GROUP=LR, LR a number"
            raise ValueError(message) from None
        if not rate > 0 or group in rates:
            raise ValueError(
                f"--group_lr entry {entry!r}: the rate must be positive and each group named once"
            )
        rates[group] = rate
    return rates


def data_flag_problem(config: TrainConfig) -> str | None:
    """What is wrong with the data flags a run uses, or None: `--dataset` names a family that
    does not exist, `--sample_rates` is not one number per family, or a `--val_dataset` entry is
    not an accepted form, or `--custom_data` is empty or malformed while `--dataset` names
    custom, or `--group_lr` is malformed, or the chain token does not fit the answers
    (`chain_token_problem`). Training flags are not checked with --eval_only, nor validation
    sets that are not evaluated (--no_eval)."""
    if not config.eval_only:
        unknown = [name for name in config.datasets if name not in FAMILY_BUILDERS]
        if unknown or not config.datasets:
            named = ", ".join(map(repr, unknown)) or "none"
            return (
                f"--dataset {config.dataset!r}: unknown family {named}; "
                f"choose from {', '.join(FAMILY_BUILDERS)}, joined by '||'"
            )
        try:
            rates = config.rates
        except ValueError:
            return f"--sample_rates {config.sample_rates!r} is not comma-separated numbers"
        try:
            if config.no_sampling:  # one source and no rates (GSVA)
                check_single_source(config.data_config())
            else:
                check_rates(config.datasets, rates)
            if CUSTOM_FAMILY in config.datasets:
                check_custom_entries(config.family_data()[CUSTOM_FAMILY])
        except ValueError as error:
            return str(error)
        if config.num_all_classes < 1:
            return f"--num_all_classes must be at least 1, got {config.num_all_classes}"
        try:
            parse_group_lr(config.group_lr)
        except ValueError as error:
            return str(error)
    if config.eval_only or not config.no_eval:
        try:
            parse_val_datasets(config.val_dataset)
        except ValueError as error:
            return str(error)
    if config.semantic_val_chunk < 0:
        return f"--semantic_val_chunk must be 0 or more, got {config.semantic_val_chunk}"
    return chain_token_problem(config)
