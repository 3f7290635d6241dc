"""The merge step behind merge_lora_weights_and_save_hf_model.py: resolve the settings of the
training run, rebuild its model, load the trained weights strictly, fold LoRA in and write our
merged checkpoint (`model.checkpoint`).

Settings come in layers: train_ds.py's defaults and recipe (`--recipe`, else the default
recipe), then the run's own `config.json` (written by train_ds.py next to `ckpt_model/`, found
by walking up from `--weight`), then the flags given on the command line. A given flag that
changes the model's structure (LoRA rank, alpha, targets, image-token wrapping, fusion,
projector width, template, chain token, vocabulary) and disagrees with the run stops the
merge: it could only produce a model that is not the one trained.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from model.builder import build_segmenter
from model.checkpoint import DEFAULT_MAX_SHARD_SIZE, merge_lora, save_merged
from model.layouts import detect_layout, image_settings_directory
from utils.config import TrainConfig, build_parser, explicit_flags, layered_values
from utils.preprocess import write_pixel_budget
from utils.weights import load_weights

LOGGER = logging.getLogger(__name__)
RUN_CONFIG_FILE = "config.json"
RUN_CONFIG_MARKERS = ("exp_name", "lora_r", "dataset")
RUN_CONFIG_SEARCH_DEPTH = 3
TRAIN_FIELDS = tuple(TrainConfig.__dataclass_fields__)
STRUCTURAL_FLAGS = (
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "use_mm_start_end",
    "early_fusion",
    "out_dim",
    "conv_type",
    "chain_token",
    "vocabulary",
)


def build_merge_parser() -> argparse.ArgumentParser:
    """train_ds.py's flags (so every README merge line parses) plus the merge's own."""
    parser = build_parser()
    parser.description = "Merge LoRA into the base weights and save a Hugging Face checkpoint."
    parser.add_argument("--save_path", required=True, help="output directory")
    parser.add_argument(
        "--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE, help="largest safetensors file"
    )
    parser.add_argument(
        "--run_config", default="", help="the run's config.json (default: found from --weight)"
    )
    return parser


def find_run_config(weight: str | Path) -> Path | None:
    """The train_ds.py `config.json` at or above `--weight` (a file, `ckpt_model/` or a
    consolidated directory), or None."""
    path = Path(weight).resolve()
    directory = path if path.is_dir() else path.parent
    for candidate in [directory, *directory.parents][:RUN_CONFIG_SEARCH_DEPTH]:
        config = candidate / RUN_CONFIG_FILE
        if config.is_file():
            data = json.loads(config.read_text())
            if all(marker in data for marker in RUN_CONFIG_MARKERS):
                return config
    return None


def check_structure(given: dict[str, object], run: dict[str, object], run_path: Path) -> None:
    """Stop when a given structural flag disagrees with the training run."""
    conflicts = [
        f"--{name} {given[name]!r} (the run used {run[name]!r})"
        for name in STRUCTURAL_FLAGS
        if name in given and name in run and given[name] != run[name]
    ]
    if conflicts:
        raise ValueError(
            f"these flags disagree with the training run's {run_path}: {'; '.join(conflicts)}. "
            "Leave them out to use the run's values."
        )


def resolve_merge_config(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """(the run's TrainConfig with the given flags applied, the merge's own options)."""
    parser = build_merge_parser()
    options = parser.parse_args(argv)
    if not options.weight:
        parser.error("--weight is required (a pytorch_model.bin, a directory, or ckpt_model)")
    given = explicit_flags(parser, argv)
    values, recipe, _ = layered_values(parser, argv)
    settings = {key: value for key, value in values.items() if key in TRAIN_FIELDS}
    run_path = Path(options.run_config) if options.run_config else find_run_config(options.weight)
    if run_path is not None:
        run = json.loads(run_path.read_text())
        check_structure(given, run, run_path)
        settings.update({key: run[key] for key in TRAIN_FIELDS if key in run and key not in given})
        LOGGER.info("settings of the training run read from %s", run_path)
    else:
        LOGGER.warning(
            "no train_ds.py config.json at or above %s: using the flags as given over the %s "
            "recipe (LoRA rank, alpha and targets must equal the training run's)",
            options.weight,
            recipe.name,
        )
    return TrainConfig(**settings), options


def merge(config: TrainConfig, weight: str, save_path: str, max_shard_size: str) -> Path:
    """Rebuild the run's model, load `weight` strictly, merge LoRA, write `save_path`."""
    model_config = replace(config.model_config(), gradient_checkpointing=False)
    layout = detect_layout(config.version)
    model, tokenizer = build_segmenter(model_config, layout)
    load_weights(model, weight)
    merged = merge_lora(model.llava)
    LOGGER.info("merged LoRA into %d layers", merged)
    provenance = {
        "base_version": str(config.version),
        "weight": str(Path(weight).resolve()),
        "precision": config.precision,
        "lora": json.dumps(
            {k: asdict(config)[k] for k in ("lora_r", "lora_alpha", "lora_target_modules")}
        ),
    }
    directory = save_merged(
        model,
        tokenizer,
        save_path,
        source_version=image_settings_directory(config.version, config.vision_tower, layout),
        conv_type=config.conv_type,
        provenance=provenance,
        max_shard_size=max_shard_size,
    )
    if (config.min_pixels, config.max_pixels) != (None, None):
        write_pixel_budget(directory, config.min_pixels, config.max_pixels)
    return directory
