"""The flags of train_ds.py (and of the tools that take them): every flag of the LISA / MMR /
GSVA scripts with their spelling and defaults, plus ours. `utils.config` resolves them over a
recipe into a `TrainConfig`.

Flags that default to True, and switches a recipe may turn on, are `BooleanOptionalAction`, so
the original bare switch still works and `--no-<flag>` turns it off (the originals could not).
Under the launcher every rank parses the same command line: only rank 0 prints a mistake.
"""

from __future__ import annotations

import argparse
import os

from model.backbone import NEW_TOKEN_ROWS
from model.builder import PRECISIONS
from model.tokens import DEFAULT_VOCABULARY, VOCABULARIES
from utils.conversation import TEMPLATES
from utils.datasets.base import (
    GSVA_ANSWER_FORM_CHOICES,
    IGNORE_PIXEL_CHOICES,
    MMR_PAIRING_CHOICES,
    NO_TARGET_ANSWER_CHOICES,
    PART_TARGET_CHOICES,
    REFER_DRAW_CHOICES,
    TOO_LONG_CHOICES,
)
from utils.datasets.lasagna import DEFAULT_NUM_ALL_CLASSES
from utils.datasets.mixer import DEFAULT_FAMILY_DATA
from utils.datasets.templates import DEFAULT_VAL_ANSWER, PROMPT_STYLES

CONV_TYPES = tuple(TEMPLATES)
EVAL_PROTOCOLS = ("teacher_forced", "generate")
ZERO_STAGES = (2, 3)
USAGE_ERROR = 2  # argparse's exit status for a bad command line
FAMILY_DATA_HELP = {
    "custom": "your own files (docs/CUSTOM_DATA.md), '||'-joined FILE[@IMAGE_ROOT][:WEIGHT] "
    "under --dataset_dir, e.g. 'mine/train.jsonl@mine/images:3||coco.json@coco/train2017'",
}


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
        "--min_pixels",
        default=None,
        type=int,
        help="Qwen-VL: the smallest pixel count an image is resized to (default: the --version "
        "directory's preprocessor_config.json)",
    )
    add(
        "--max_pixels",
        default=None,
        type=int,
        help="Qwen-VL: the largest pixel count an image is resized to, so at most "
        "max_pixels / 28^2 (Qwen3-VL: 32^2) image tokens (default: the directory's)",
    )
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
    add(
        "--conv_type",
        default="llava_v1",
        choices=CONV_TYPES,
        help="LLaVA's templates; *_cores: with CoReS's system prompt and in-context example",
    )
    add(
        "--chain_token",
        default="",
        help="a token whose mask prompts (dense prompt) the next [SEG]/[REJ] of its "
        "conversation, e.g. CoReS's [SEG_SEMA] (default: no chaining)",
    )
    add(
        "--vocabulary",
        default=DEFAULT_VOCABULARY,
        choices=sorted(VOCABULARIES),
        help="the tokens of the [SEG]/[REJ] roles: lisa ([SEG], [REJ]) or lasagna (LaSagnA's "
        "<ins>, <no_ins> and its <cat_start>, <cat_end>, <semantic>); a trained checkpoint "
        "keeps its own",
    )
    add(
        "--supervise_coarse",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="also BCE + Dice on each chain token's mask against the target it prompts",
    )
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
        add(f"--{family}_data", default=default, help=FAMILY_DATA_HELP.get(family))
    add(
        "--val_dataset",
        default="ReasonSeg|val",
        help='"||"-joined, e.g. "grefcoco|unc|val", "custom|mine/val.jsonl@mine/images"',
    )
    add("--val_json_name", default="", help="MMR / RefCOCOm annotation file")
    add(
        "--val_answer",
        default=DEFAULT_VAL_ANSWER,
        help="the answer of the single-target validation conversations (ReasonSeg, refCOCO "
        "family, RefCOCOm), one [SEG]; CoReS: 'It usually appears on [SEG_SEMA]. It is [SEG].'",
    )
    add("--explanatory", default=0.1, type=float, help="-1 disables ReasonSeg explanations")
    add("--num_classes_per_sample", default=3, type=int)
    add("--num_classes_per_question", default=3, type=int)
    add(
        "--num_all_classes",
        default=DEFAULT_NUM_ALL_CLASSES,
        type=int,
        help="lasagna_sem_seg: classes named per answer (LaSagnA's random class list)",
    )
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
        "--refer_draw",
        default="reference",
        choices=REFER_DRAW_CHOICES,
        help="referring sentences per sample: up to --num_classes_per_sample, all-absent draws "
        "redrawn in gsva style (the papers), or 1 to that many with all-absent draws kept",
    )
    add(
        "--gsva_answer_form",
        default="drawn",
        choices=GSVA_ANSWER_FORM_CHOICES,
        help="gsva-style answers: one of GSVA's five forms per answer (the papers), or always "
        "its 'Sure, they are a:[SEG], b:[REJ].' form, the one its validation answers are read in",
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
    add(
        "--group_lr",
        default="",
        help="learning rates of trainable groups, GROUP=LR joined by ',' (groups: lora, "
        "embed_tokens, lm_head, mask_decoder, text_hidden_fcs, early_fusion, mm_projector); "
        "the others train at --lr, all under the one warm-up and decay",
    )
    add("--beta1", default=0.9, type=float)
    add("--beta2", default=0.95, type=float)
    add("--warmup_steps", default=100, type=int, help="linear warm-up steps of WarmupDecayLR")
    add("--ce_loss_weight", default=1.0, type=float)
    add("--dice_loss_weight", default=0.5, type=float)
    add("--bce_loss_weight", default=2.0, type=float)
    add("--no_eval", action="store_true", help="skip validation, save every epoch")
    add("--eval_only", action="store_true")
    add("--eval_steps", default=0, type=int, help="also validate every N steps (0: off)")
    add(
        "--eval_protocol",
        default="teacher_forced",
        choices=EVAL_PROTOCOLS,
        help="referring/reasoning sets; the semantic sets (ade20k|val, ...) always generate",
    )
    add("--max_new_tokens", default=512, type=int, help="answer length cap (generate protocol)")
    add(
        "--lasagna_miou_compat",
        action="store_true",
        help="semantic sets: LaSagnA's own mIoU (ignore pixels scored as class 0, fuzzy "
        "matching without threshold)",
    )
    add(
        "--semantic_val_chunk",
        default=0,
        type=int,
        help="semantic sets: class names per question (0: LaSagnA's, the whole list at once)",
    )
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
    add(
        "--full_logits",
        action="store_true",
        help="compute the LM head on every position in training (the old path; by default only "
        "the scored and [SEG]/[REJ]-deciding positions)",
    )
    add(
        "--packing",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="run the language model padding-free in training and teacher-forced evaluation: "
        "conversations packed into rows with restarting positions, attention confined to each "
        "(generation never packs). Default: on with flash_attention_2 and sdpa (one varlen row "
        "per micro-batch; sdpa runs one attention call per conversation), off with eager (rows "
        "of at most the padded length)",
    )
    add(
        "--estimate_memory",
        action="store_true",
        help="print the per-GPU memory of this run by part (no weights loaded) and exit; "
        "with --json as one JSON object",
    )
    add(
        "--gpu_memory_gb",
        default=80.0,
        type=float,
        help="with --estimate_memory: the card's memory, to say which settings fit",
    )
    add(
        "--estimate_gpus",
        default=1,
        type=int,
        help="with --estimate_memory: the GPUs ZeRO partitions over",
    )


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
