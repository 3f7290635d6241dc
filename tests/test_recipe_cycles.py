"""The whole cycle with the LISA and GSVA recipes on the tiny assets: `--recipe lisa|gsva` trains
under the real DeepSpeed launcher on two CPU ranks with the recipe's own data mix, prompt style
and validation sets, the merge reads the run's settings, and `--eval_only` on the merged
checkpoint reproduces the in-training validation. No `--out_dim` is given: the projector
follows the tiny SAM's prompt width, in training (the SAM file) and in evaluation (the merged
checkpoint's SAM). (The m2sa recipe's cycle is the shared `launched_run` of
tests/test_train_ds.py and tests/test_merge_chat.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e import LAUNCHER_PORT, SHORT_RUN_FLAGS, python, run
from utils.evaluation import safe_name

RECIPE_SETTINGS = {
    "lisa": {"prompt_style": "lisa", "model_max_length": 512, "sample_rates": "9,3,3,1"},
    "gsva": {"prompt_style": "gsva", "model_max_length": 1024, "num_classes_per_sample": 5},
}


def paths(assets: Path, runs: Path, exp_name: str) -> list[str]:
    return [
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
    ]


@pytest.mark.parametrize("recipe", sorted(RECIPE_SETTINGS))
def test_recipe_trains_merges_and_evaluates(assets: Path, tmp_path: Path, recipe: str) -> None:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = [str(deepspeed), "--num_gpus", "2", "--master_port", str(LAUNCHER_PORT + 1)]
    train = [f"--recipe={recipe}", f"--version={assets / 'llava_tiny'}", *SHORT_RUN_FLAGS]
    run([*launcher, "train_ds.py", *train, *paths(assets, tmp_path, recipe)], 900)
    run_dir = tmp_path / recipe
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"] == recipe and not config["early_fusion"]
    assert {k: config[k] for k in RECIPE_SETTINGS[recipe]} == RECIPE_SETTINGS[recipe]
    in_training = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["results"]
    assert list(in_training) == config["val_dataset"].split("||")

    merged = tmp_path / f"{recipe}-merged"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--version={assets / 'llava_tiny'}",
        f"--weight={run_dir / 'ckpt_model'}",
        f"--save_path={merged}",
    )
    evaluation = [f"--recipe={recipe}", f"--version={merged}", "--eval_only", *SHORT_RUN_FLAGS]
    python("train_ds.py", *evaluation, *paths(assets, tmp_path, "eval"))
    for name, summary in in_training.items():
        evaluated = (tmp_path / "eval" / f"eval_{safe_name(name)}.json").read_text()
        evaluated = json.loads(evaluated)["summary"]
        for metric, value in summary.items():
            expected = pytest.approx(value, abs=1e-5) if value is not None else None
            assert evaluated[metric] == expected, (recipe, name, metric)
