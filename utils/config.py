"""Command line of train_ds.py: every flag of the LISA / MMR / GSVA scripts (same spelling and
defaults), plus ours, resolved into one typed `TrainConfig`.

This is the only place that knows LISA's string formats ("sem_seg||refer_seg", "9,3,3,1",
"q_proj,v_proj"). Flags that default to True are `BooleanOptionalAction`, so the original bare
switch still works and `--no-<flag>` turns it off (the originals could not).

Three layers decide each field, the later winning: the built-in default of its flag, the recipe
(`--recipe NAME|PATH`, `utils.recipes`; without one the `m2sa` recipe, so the MMR README's
command trains M2SA as its README says), and the flags given on the command line.
`resolve_config` also says where each field came from (`--print_config`).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.backbone import NEW_TOKEN_ROWS, parse_token_init
from model.builder import PRECISIONS, ModelConfig
from model.losses import LossWeights
from utils.datasets.base import (
    IGNORE_PIXEL_CHOICES,
    MMR_PAIRING_CHOICES,
    NO_TARGET_ANSWER_CHOICES,
    PART_TARGET_CHOICES,
    TOO_LONG_CHOICES,
    SamplingOptions,
)
from utils.datasets.mixer import (
    DEFAULT_FAMILY_DATA,
    FAMILY_BUILDERS,
    DataConfig,
    check_rates,
    check_single_source,
)
from utils.datasets.templates import PROMPT_STYLES
from utils.datasets.validation import gsva_epoch_validation, parse_val_datasets
from utils.recipes import DEFAULT_RECIPE, Recipe, RecipeError, load_recipe

LOGGER = logging.getLogger(__name__)
CONV_TYPES = ("llava_v1", "llava_llama_2")
EVAL_PROTOCOLS = ("teacher_forced", "generate")
ZERO_STAGES = (2, 3)
# GSVA flags accepted for command-line compatibility but without effect here
IGNORED_FLAGS = ("merge_lora_path",)
USAGE_ERROR = 2  # argparse's exit status for a bad command line
# where a field's value came from (`ResolvedConfig.sources`)
FROM_DEFAULT, FROM_RECIPE, FROM_COMMAND_LINE = "default", "recipe", "command line"


@dataclass(frozen=True)
class TrainConfig:
    """Every train_ds.py setting; see `build_parser` for each flag's help."""

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
    val_dataset: str
    val_json_name: str
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
    use_expand_question_list: bool
    prompt_style: str
    ignore_pixels: str
    part_targets: str
    mmr_pairing: str
    no_target_answer: str
    too_long: str
    exclude_val: bool
    skip_bad_samples: bool
    no_eval: bool
    eval_only: bool
    eval_steps: int
    eval_protocol: str
    max_new_tokens: int
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

    @property
    def log_dir(self) -> Path:
        return Path(self.log_base_dir) / self.exp_name

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(name for name in self.dataset.split("||") if name)

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(float(rate) for rate in self.sample_rates.split(",") if rate.strip())

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
        )

    def data_config(self) -> DataConfig:
        return DataConfig(
            dataset_dir=Path(self.dataset_dir),
            dataset=self.datasets,
            sample_rates=self.rates,
            family_data=self.family_data(),
            options=self.sampling_options(),
            seed=self.seed,
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
            new_token_init=tuple(parse_token_init(self.new_token_init).items()),
            new_token_rows=self.new_token_rows,
            loss_weights=LossWeights(
                ce_loss_weight=self.ce_loss_weight,
                bce_loss_weight=self.bce_loss_weight,
                dice_loss_weight=self.dice_loss_weight,
            ),
        )


def _model_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--version",
        "--mllm_model_path",
        dest="version",
        default="liuhaotian/llava-llama-2-13b-chat-lightning-preview",
        help="LLaVA directory (HF format, or legacy LLaVA-v1) or a merged checkpoint",
    )
    add(
        "--vision_pretrained",
        "--segmentation_model_path",
        dest="vision_pretrained",
        default="./vision_pretrained/sam_vit_h_4b8939.pth",
        help="original SAM checkpoint",
    )
    add(
        "--vision-tower",
        "--vision_tower",
        dest="vision_tower",
        default="openai/clip-vit-large-patch14",
        help="CLIP tower for legacy LLaVA-v1 bases; unused when --version has its own",
    )
    add("--precision", default="bf16", choices=sorted(PRECISIONS))
    add("--image_size", default=1024, type=int, help="SAM input side")
    add("--model_max_length", default=2048, type=int)
    add(
        "--out_dim",
        default=None,
        type=int,
        help="projected [SEG] width; default: the SAM checkpoint's prompt width (256 for every "
        "released SAM); a value that differs from it stops the run",
    )
    add("--lora_r", default=8, type=int, help="0: no LoRA (LLM frozen)")
    add("--lora_alpha", default=16, type=int)
    add("--lora_dropout", default=0.05, type=float)
    add("--lora_target_modules", default="q_proj,v_proj")
    add(
        "--new_token_init",
        default="",
        help="start new tokens' embedding and LM-head rows as a word's, e.g. '[SEG]=yes,[REJ]=no' "
        "(default: the mean row)",
    )
    add(
        "--new_token_rows",
        default="mean",
        choices=NEW_TOKEN_ROWS,
        help="rows of tokens this run adds: the mean row, or N(0, initializer_range) as the "
        "LISA family's transformers 4.31",
    )
    add("--conv_type", default="llava_v1", choices=CONV_TYPES)
    add("--attn_implementation", default="sdpa", choices=("sdpa", "flash_attention_2", "eager"))
    add(
        "--early_fusion",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="M2SA early-feature fusion",
    )
    add("--weight", default="", help="state dict / DeepSpeed checkpoint loaded over --version")
    for flag, help_text in (
        ("gradient_checkpointing", "recompute LLM activations in backward"),
        ("train_mask_decoder", "train SAM's mask decoder"),
        ("use_mm_start_end", "wrap image tokens in <im_start>/<im_end>"),
    ):
        add(f"--{flag}", default=True, action=argparse.BooleanOptionalAction, help=help_text)
    add(
        "--train_mm_projector",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="also train LLaVA's projector",
    )


def _data_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--dataset_dir", default="./dataset")
    add("--dataset", default="sem_seg||refer_seg||vqa||multi_part_reason_seg")
    add("--sample_rates", default="2,9,2,6")
    for family, default in DEFAULT_FAMILY_DATA.items():
        add(f"--{family}_data", default=default)
    add("--val_dataset", default="ReasonSeg|val", help='"||"-joined, e.g. "grefcoco|unc|val"')
    add("--val_json_name", default="", help="MMR / RefCOCOm annotation file")
    add("--explanatory", default=0.1, type=float, help="-1 disables ReasonSeg explanations")
    add("--num_classes_per_sample", default=3, type=int)
    add("--num_classes_per_question", default=3, type=int)
    add("--use_expand_question_list", default=True, action=argparse.BooleanOptionalAction)
    add("--prompt_style", default="mmr", choices=PROMPT_STYLES)
    add(
        "--ignore_pixels",
        default="background",
        choices=IGNORE_PIXEL_CHOICES,
        help="sem_seg/ReasonSeg ignore pixels (255): trained as background (the papers) or "
        "excluded from the mask loss",
    )
    add(
        "--part_targets",
        default="instance",
        choices=PART_TARGET_CHOICES,
        help="PACO-LVIS/PASCAL-Part: one target per annotation (the papers) or per category",
    )
    add(
        "--mmr_pairing",
        default="aligned",
        choices=MMR_PAIRING_CHOICES,
        help="MMR questions with their own answers, or the released M2SA loader's pairing",
    )
    add(
        "--no_target_answer",
        default="rej",
        choices=NO_TARGET_ANSWER_CHOICES,
        help="lisa/mmr styles, referring sentences without a target: [REJ], or [SEG] with an "
        "empty mask (LISA, MMR)",
    )
    add(
        "--too_long",
        default="truncate",
        choices=TOO_LONG_CHOICES,
        help="conversations over --model_max_length: cut (the papers) or dropped whole",
    )
    add(
        "--exclude_val",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="keep refCOCO val/test images out of training",
    )
    add(
        "--skip_bad_samples",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="skip (and count per source, each epoch) records that fail to read during training",
    )
    add("--workers", default=4, type=int)


def _run_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--recipe", default="", help="a recipe name under configs/ or a recipe file's path")
    add(
        "--print_config",
        action="store_true",
        help="print the resolved configuration as JSON and exit",
    )
    add("--local_rank", "--local-rank", dest="local_rank", default=0, type=int)
    add("--log_base_dir", default="./runs")
    add(
        "--force_unlock",
        action="store_true",
        help="take over the run directory even when its lock names a live run",
    )
    add("--exp_name", default="m2sa")
    add("--vis_save_path", default="./vis_output")
    add("--epochs", default=10, type=int)
    add("--steps_per_epoch", default=500, type=int, help="optimizer steps per epoch")
    add("--batch_size", default=2, type=int, help="images per micro-batch per GPU")
    add("--grad_accumulation_steps", default=10, type=int)
    add("--val_batch_size", default=1, type=int)
    add("--lr", default=0.0003, type=float)
    add("--beta1", default=0.9, type=float)
    add("--beta2", default=0.95, type=float)
    add("--warmup_steps", default=100, type=int, help="linear warm-up steps of WarmupDecayLR")
    add("--ce_loss_weight", default=1.0, type=float)
    add("--dice_loss_weight", default=0.5, type=float)
    add("--bce_loss_weight", default=2.0, type=float)
    add("--no_eval", action="store_true", help="skip validation, save every epoch")
    add("--eval_only", action="store_true")
    add("--eval_steps", default=0, type=int, help="also validate every N steps (0: off)")
    add("--eval_protocol", default="teacher_forced", choices=EVAL_PROTOCOLS)
    add("--max_new_tokens", default=512, type=int, help="answer length cap (generate protocol)")
    add("--resume", default="")
    add("--auto_resume", default=True, action=argparse.BooleanOptionalAction)
    add("--start_epoch", default=0, type=int)
    add("--print_freq", default=1, type=int)
    add("--seed", default=42, type=int)
    add("--zero_stage", default=2, type=int, choices=ZERO_STAGES)
    add(
        "--offload_optimizer",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="ZeRO optimizer state on the CPU",
    )
    add("--load_in_8bit", action="store_true", help="quantised LLM (GPU inference only)")
    add("--load_in_4bit", action="store_true", help="quantised LLM (GPU inference only)")
    add(
        "--no_sampling",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="GSVA: each epoch is one shuffled pass over the one --dataset source (one family, "
        "one sub-dataset) instead of --sample_rates draws",
    )
    add(
        "--val_refzom",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="GSVA: validate on RefZOM (refzom|final|test) in place of grefcoco|unc|val",
    )
    add("--merge_lora_path", default="", help=argparse.SUPPRESS)


class RankZeroParser(argparse.ArgumentParser):
    """Under the launcher every rank parses the same command line and meets the same mistake:
    only rank 0 (the `RANK` the launcher sets; a plain run is rank 0) prints it."""

    def _print_message(self, message: str, file=None) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    parser = RankZeroParser(
        description="Train or evaluate the segmenter (launch with deepspeed).",
        allow_abbrev=False,
    )
    _model_flags(parser)
    _data_flags(parser)
    _run_flags(parser)
    return parser


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


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, object]:
    """The destinations the command line sets itself, with their parsed values."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


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


def resolve_config(argv: list[str] | None = None) -> ResolvedConfig:
    """Parse a train_ds.py command line (last of repeated flags wins) over its recipe; a bad
    recipe or data flag exits with one line and argparse's usage status."""
    parser = build_parser()
    try:
        values, recipe, sources = layered_values(parser, argv)
    except RecipeError as error:
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {error}\n")
    for flag in IGNORED_FLAGS:
        if values[flag]:
            LOGGER.warning("--%s is accepted for compatibility and has no effect", flag)
    config = TrainConfig(**values)
    problem = data_flag_problem(config)
    if problem:
        # parser.error's 50-line usage would bury the one line that matters
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {problem}\n")
    return ResolvedConfig(config, recipe, sources)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a train_ds.py command line (see `resolve_config`)."""
    return resolve_config(argv).config


def data_flag_problem(config: TrainConfig) -> str | None:
    """What is wrong with the data flags a run uses, or None: `--dataset` names a family that
    does not exist, `--sample_rates` is not one number per family, or a `--val_dataset` entry is
    not an accepted form. Training flags are not checked with --eval_only, nor validation sets
    that are not evaluated (--no_eval)."""
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
        except ValueError as error:
            return str(error)
    if config.eval_only or not config.no_eval:
        try:
            parse_val_datasets(config.val_dataset)
        except ValueError as error:
            return str(error)
    return None
