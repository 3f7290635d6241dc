"""Recipes (configs/*.yaml, utils/recipes.py, utils/config.resolve_config): each README training
line resolves to its paper's settings field by field; layers and sources; bad recipe files.

The expected settings below are written from the reference code, not read from our recipe
files: LISA `train_ds.py` @3cb2d43 (dvlab-research/LISA), GSVA `main.py` and
`scripts/train_demo.sh` @618dc79 (LeapLabTHU/GSVA), MMR `train_ds.py` and README @702a7b6
(jdg900/MMR), CoReS `train_ds_best.py` (its README's training script), `utils/dataset.py` and
`model/llava/conversation.py` @296ee1f (baoxiaoyi/CoReS), LaSagnA `train_ds.py`, README and
`utils/sem_seg_dataset.py` @897cbbe (congvvc/LaSagnA), and each loader's behaviour
(../shared/REFERENCE.md section 11).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_readme import README, shell_commands
from utils.config import FROM_COMMAND_LINE, FROM_DEFAULT, FROM_RECIPE, parse_args, resolve_config
from utils.recipes import DEFAULT_RECIPE, RecipeError, available_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[2]

# what every one of the three reference scripts shares (identical argparse defaults)
COMMON = {
    "sem_seg_data": "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
    "refer_seg_data": "refclef||refcoco||refcoco+||refcocog",
    "vqa_data": "llava_instruct_150k",
    "explanatory": 0.1,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": "q_proj,v_proj",
    "lr": 0.0003,
    "beta1": 0.9,
    "beta2": 0.95,
    "warmup_steps": 100,
    "epochs": 10,
    "steps_per_epoch": 500,
    "ce_loss_weight": 1.0,
    "dice_loss_weight": 0.5,
    "bce_loss_weight": 2.0,
    "precision": "bf16",
    "image_size": 1024,
    "conv_type": "llava_v1",
    "use_mm_start_end": True,
    "train_mask_decoder": True,
    "gradient_checkpointing": True,
    "val_batch_size": 1,
    "zero_stage": 2,
    # loaders: masks are (label == class), one target per part annotation, collate truncates,
    # new rows from transformers 4.31's resize_token_embeddings
    "ignore_pixels": "background",
    "part_targets": "instance",
    "too_long": "truncate",
    "new_token_rows": "normal",
    # every reference loader draws as many sentences as it may (GSVA redraws all-[REJ] samples)
    "refer_draw": "reference",
    # GSVA's loaders draw one of its five answer forms per answer
    "gsva_answer_form": "drawn",
}
PAPER_SETTINGS: dict[str, dict[str, object]] = {
    "lisa": {
        **COMMON,
        "dataset": "sem_seg||refer_seg||vqa||reason_seg",
        "sample_rates": "9,3,3,1",
        "reason_seg_data": "ReasonSeg|train",
        "model_max_length": 512,
        "lora_r": 8,
        "batch_size": 2,
        "grad_accumulation_steps": 10,
        "workers": 4,
        "num_classes_per_sample": 3,
        "prompt_style": "lisa",
        "use_expand_question_list": False,
        "no_target_answer": "empty_seg",
        "early_fusion": False,
        "auto_resume": True,
        "val_dataset": "ReasonSeg|val",
    },
    "gsva": {
        **COMMON,
        "dataset": "sem_seg||refer_seg||vqa||reason_seg",
        "sample_rates": "9,3,3,1",
        "reason_seg_data": "ReasonSeg|train",
        "model_max_length": 1024,
        "lora_r": 8,  # train_demo.sh: 8 for 7B
        "batch_size": 20,
        "grad_accumulation_steps": 1,
        "workers": 8,
        "num_classes_per_sample": 5,  # train_demo.sh
        "prompt_style": "gsva",
        "use_expand_question_list": False,
        "early_fusion": False,
        "auto_resume": False,
        "val_dataset": "grefcoco|unc|val||ReasonSeg|val",
    },
    "cores": {
        **COMMON,
        "dataset": "sem_seg||refer_seg||vqa||reason_seg",
        "sample_rates": "9,3,3,1",
        "reason_seg_data": "ReasonSeg|train",
        "model_max_length": 512,
        "lora_r": 8,
        "batch_size": 2,
        "grad_accumulation_steps": 10,
        "workers": 4,
        "num_classes_per_sample": 3,
        "epochs": 50,  # train_ds_best.py (LISA: 10)
        "prompt_style": "cores",  # LISA's loaders with CoReS's ANSWER_LIST
        "use_expand_question_list": False,
        "no_target_answer": "empty_seg",
        "conv_type": "llava_v1_cores",  # llava_v1 + CoReS's system prompt and in-context example
        "chain_token": "[SEG_SEMA]",
        "supervise_coarse": False,  # model/CORES.py supervises the [SEG] mask only
        "early_fusion": False,
        "auto_resume": True,
        "no_eval": False,
        "val_dataset": "ReasonSeg|val",
        "val_answer": "It usually appears on [SEG_SEMA]. It is [SEG].",
    },
    "lasagna": {
        **COMMON,
        # its sem_seg is its own class-sequence SemSegDataset: our lasagna_sem_seg family
        "dataset": "lasagna_sem_seg||refer_seg||vqa||reason_seg",
        "sample_rates": "10,6,1,2",
        # --sem_seg_data "cocostuff||ade20k||mapillary||cityscapes||openimage", less openimage
        "lasagna_sem_seg_data": "cocostuff||ade20k||mapillary||cityscapes",
        "reason_seg_data": "ReasonSeg|train",
        "num_all_classes": 80,
        "model_max_length": 1024,
        "lora_r": 8,
        "batch_size": 2,
        "grad_accumulation_steps": 10,
        "workers": 4,
        "num_classes_per_sample": 5,
        "epochs": 36,  # LISA: 10
        "vocabulary": "lasagna",  # <ins> / <no_ins> for [SEG] / [REJ]
        "prompt_style": "lisa",  # its referring / reasoning answers: one <ins> each
        "use_expand_question_list": False,
        "no_target_answer": "empty_seg",
        "early_fusion": False,
        "auto_resume": True,
        "no_eval": False,
        "exp_name": "LaSagnA-7b",
        "val_dataset": "ReasonSeg|val",
    },
    "m2sa": {
        **COMMON,
        "dataset": "sem_seg||refer_seg||vqa||multi_part_reason_seg",
        "sample_rates": "2,9,2,6",
        "multi_part_reason_seg_data": "MMR_train.json",
        "model_max_length": 2048,
        "lora_r": 8,
        "batch_size": 2,
        "grad_accumulation_steps": 10,
        "workers": 4,
        "num_classes_per_sample": 3,
        "num_classes_per_question": 3,
        "prompt_style": "mmr",
        "use_expand_question_list": True,
        "mmr_pairing": "aligned",
        "no_target_answer": "empty_seg",
        "early_fusion": True,
        "auto_resume": True,
        "val_dataset": "MultiPartReasonSeg|val",
        "val_json_name": "MMR_val.json",
    },
}
# ours (no paper): M2SA's experiment on Qwen2.5-VL with SAM 2, the backbone's own settings changed
PAPER_SETTINGS["qwen2_5_vl"] = {
    **PAPER_SETTINGS["m2sa"],
    "conv_type": "qwen2_vl",
    "max_pixels": 802816,  # at most 1024 image tokens of 28 x 28 pixels
    "min_pixels": None,  # the directory's
    "early_fusion": False,
    "new_token_rows": "mean",
    "vision_pretrained": "./vision_pretrained/sam2.1_hiera_large.pt",
    "exp_name": "qwen2_5_vl-m2sa",
}
# what a README line may set itself without changing the experiment
RUN_SPECIFIC = {
    "recipe",
    "version",
    "vision_pretrained",
    "vision_tower",
    "dataset_dir",
    "exp_name",
    "weight",
}


def trains_own_data(args: list[str]) -> bool:
    """A line that fine-tunes on the user's files (the `custom` family): an example of the
    custom-data guide, not a paper's experiment."""
    return "custom" in resolve_config(args).config.dataset.split("||")


def readme_training_lines() -> list[list[str]]:
    """The train_ds.py arguments of every README command that trains a paper's experiment (no
    --eval_only, not on the user's own data)."""
    lines = []
    for argv in shell_commands(README.read_text()):
        if "train_ds.py" in argv:
            args = argv[argv.index("train_ds.py") + 1 :]
            if "--eval_only" not in args and "--print_config" not in args:
                lines.append(args)
    return [args for args in lines if not trains_own_data(args)]


def test_the_readme_shows_a_training_line_on_own_data() -> None:
    """The filter above leaves out exactly the "Your own data" example."""
    own = []
    for argv in shell_commands(README.read_text()):
        if "train_ds.py" in argv and "--eval_only" not in argv:
            args = argv[argv.index("train_ds.py") + 1 :]
            if "--print_config" not in args and trains_own_data(args):
                own.append(args)
    assert len(own) == 1 and "--custom_data=mine/train.jsonl@mine/images" in own[0]


def test_the_readme_trains_every_paper_recipe() -> None:
    recipes = {resolve_config(args).config.recipe for args in readme_training_lines()}
    assert recipes == set(PAPER_SETTINGS)


@pytest.mark.parametrize("args", readme_training_lines(), ids=" ".join)
def test_each_readme_training_line_is_its_papers_experiment(args: list[str]) -> None:
    resolved = resolve_config(args)
    expected = PAPER_SETTINGS[resolved.config.recipe]
    actual = {name: getattr(resolved.config, name) for name in expected}
    assert actual == expected
    overridden = {n for n, s in resolved.sources.items() if s == FROM_COMMAND_LINE}
    assert overridden - RUN_SPECIFIC <= {n for n in expected if n in overridden}


@pytest.mark.parametrize("recipe", sorted(PAPER_SETTINGS))
def test_each_recipe_file_sets_its_papers_settings(recipe: str) -> None:
    resolved = resolve_config(["--recipe", recipe])
    expected = PAPER_SETTINGS[recipe]
    assert {name: getattr(resolved.config, name) for name in expected} == expected


def test_the_mmr_readme_line_verbatim_trains_m2sa_with_early_fusion() -> None:
    mmr = [args for args in readme_training_lines() if "--use_expand_question_list" in args]
    assert len(mmr) == 1 and "--recipe" not in mmr[0]
    config = resolve_config(mmr[0]).config
    assert config.recipe == DEFAULT_RECIPE == "m2sa" and config.early_fusion


def test_every_shipped_recipe_is_listed_and_loads() -> None:
    assert set(PAPER_SETTINGS) <= set(available_recipes())
    for name in available_recipes():
        assert resolve_config(["--recipe", name]).config.recipe == name


def test_layers_and_sources() -> None:
    resolved = resolve_config(["--recipe", "lisa", "--lora_r", "16", "--seed", "7"])
    assert resolved.config.lora_r == 16 and resolved.sources["lora_r"] == FROM_COMMAND_LINE
    assert resolved.config.model_max_length == 512
    assert resolved.sources["model_max_length"] == FROM_RECIPE
    assert resolved.sources["local_rank"] == FROM_DEFAULT
    # the last of repeated flags wins, over the recipe too
    config = parse_args(["--recipe", "gsva", "--batch_size", "3", "--batch_size=4"])
    assert config.batch_size == 4 and config.grad_accumulation_steps == 1


def test_a_copied_recipe_file_is_a_new_experiment(tmp_path: Path) -> None:
    text = (ROOT / "configs" / "lisa.yaml").read_text()
    mine = tmp_path / "my_lisa.yaml"
    mine.write_text(text.replace("model_max_length: 512", "model_max_length: 1536"))
    resolved = resolve_config(["--recipe", str(mine)])
    assert resolved.config.recipe == "my_lisa" and resolved.config.model_max_length == 1536
    assert resolved.config.prompt_style == "lisa" and resolved.recipe.path == mine


def test_yaml_lists_join_as_the_flags_do(tmp_path: Path) -> None:
    recipe = tmp_path / "lists.yaml"
    recipe.write_text("dataset: [sem_seg, vqa]\nsample_rates: [3, 1.5]\nlr: 1\n")
    config = parse_args(["--recipe", str(recipe)])
    assert config.dataset == "sem_seg||vqa" and config.rates == (3.0, 1.5)
    assert config.lr == 1.0 and isinstance(config.lr, float)


def test_a_recipe_may_name_custom_data(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "dataset: [custom, refer_seg]\nsample_rates: [3, 1]\n"
        "custom_data: [mine/train.jsonl@mine/images:3, mine/refcoco.jsonl@.]\n"
        "val_dataset: custom|mine/val.jsonl@mine/images\n"
    )
    config = parse_args(["--recipe", str(recipe)])
    assert config.data_config().family_data["custom"] == (
        "mine/train.jsonl@mine/images:3",
        "mine/refcoco.jsonl@.",
    )
    assert config.val_dataset == "custom|mine/val.jsonl@mine/images"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_rank: 8\n", "unknown key 'lora_rank'"),
        ("lora_r: eight\n", "key 'lora_r': expected a int, got 'eight'"),
        ("lora_r: 8.5\n", "key 'lora_r': expected a int, got 8.5"),
        ("early_fusion: 1\n", "key 'early_fusion': expected true or false, got 1"),
        ("lr: true\n", "key 'lr': expected a float, got True"),
        ("prompt_style: plain\n", "key 'prompt_style': 'plain' is not one of lisa, mmr, gsva"),
        ("local_rank: 1\n", "unknown key 'local_rank'"),
        ("- lora_r\n", "expected a mapping of flag names to values, not list"),
        ("lora_r: [8\n", "not a readable YAML file"),
    ],
)
def test_bad_recipe_files_name_file_key_and_expectation(
    tmp_path: Path, text: str, message: str
) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=r"bad\.yaml") as error:
        load_recipe(str(recipe), __import__("utils.config").config.build_parser())
    assert message in str(error.value)


def test_unknown_recipe_names_the_shipped_ones() -> None:
    with pytest.raises(RecipeError, match="shipped recipes: .*gsva.*lisa.*m2sa"):
        load_recipe("lisa-7b", __import__("utils.config").config.build_parser())
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe("configs/nothing.yaml", __import__("utils.config").config.build_parser())


def run_train_ds(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train_ds.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_print_config_prints_one_json_object_and_loads_nothing() -> None:
    # a --version that does not exist proves no model is loaded
    done = run_train_ds(
        "--recipe", "gsva", "--version", "/nonexistent", "--lr=1e-4", "--print_config"
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["recipe"] == "gsva" and printed["recipe_file"].endswith("configs/gsva.yaml")
    assert printed["batch_size"] == 20 and printed["lr"] == 1e-4
    assert printed["sources"]["lr"] == FROM_COMMAND_LINE
    assert printed["sources"]["batch_size"] == FROM_RECIPE
    assert printed["sources"]["seed"] == FROM_DEFAULT
    fields = set(printed) - {"recipe_file", "sources"}
    assert fields == set(printed["sources"]) == set(parse_args([]).__dataclass_fields__)


def test_a_bad_recipe_stops_train_ds_in_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("batch_sise: 2\n")
    done = run_train_ds("--recipe", str(recipe), "--print_config")
    assert done.returncode == 2 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert str(recipe) in last and "unknown key 'batch_sise'" in last
    assert "Traceback" not in done.stderr


def test_val_refzom_replaces_gsva_grefcoco_validation_or_adds_it() -> None:
    """GSVA main.py: --val_refzom runs the per-epoch GRES evaluation on RefZOM, not gRefCOCO."""
    gsva = resolve_config(["--recipe", "gsva", "--val_refzom"])
    assert gsva.config.val_dataset == "refzom|final|test||ReasonSeg|val"
    assert gsva.sources["val_dataset"] == FROM_COMMAND_LINE
    lisa = parse_args(["--recipe", "lisa", "--val_refzom"])
    assert lisa.val_dataset == "ReasonSeg|val||refzom|final|test"
    assert parse_args(["--recipe", "gsva"]).val_dataset == "grefcoco|unc|val||ReasonSeg|val"
