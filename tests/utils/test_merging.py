"""How the merge resolves its settings: the run's config.json found from --weight, flags
given on the command line on top, and structural disagreements refused."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from utils.config import parse_args
from utils.merging import find_run_config, resolve_merge_config


def write_run(directory: Path, **flags) -> Path:
    """A run directory as train_ds.py leaves it: config.json and ckpt_model/latest."""
    argv = [f"--{name}" if value is True else f"--{name}={value}" for name, value in flags.items()]
    config = parse_args(["--version=/base/llava", *argv])
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(asdict(config)))
    (directory / "ckpt_model" / "global_step6").mkdir(parents=True)
    (directory / "ckpt_model" / "latest").write_text("global_step6")
    (directory / "pytorch_model.bin").write_bytes(b"")
    return directory


def test_the_run_config_is_found_from_every_weight_layout(tmp_path) -> None:
    run = write_run(tmp_path / "runs" / "exp", lora_r=16)
    for weight in (
        run / "ckpt_model",
        run / "ckpt_model" / "global_step6",
        run / "pytorch_model.bin",
    ):
        assert find_run_config(weight) == (run / "config.json").resolve()
    # a Hugging Face config.json (no train_ds.py fields) is not taken for a run's
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert find_run_config(tmp_path / "hf") is None


def test_flags_not_given_come_from_the_run(tmp_path) -> None:
    run = write_run(
        tmp_path / "exp",
        lora_r=16,
        lora_alpha=32,
        lora_target_modules="q_proj,k_proj,v_proj",
        conv_type="llava_llama_2",
        precision="fp32",
        early_fusion=True,
    )
    config, options = resolve_merge_config(
        [f"--weight={run / 'ckpt_model'}", "--save_path=out", "--precision=bf16"]
    )
    assert (config.lora_r, config.lora_alpha) == (16, 32)
    assert config.lora_target_modules == "q_proj,k_proj,v_proj"
    assert config.conv_type == "llava_llama_2" and config.version == "/base/llava"
    assert config.early_fusion and config.precision == "bf16"  # the latter given here
    assert options.save_path == "out"


def test_a_given_flag_that_changes_the_model_is_refused(tmp_path) -> None:
    run = write_run(tmp_path / "exp", lora_r=16)
    with pytest.raises(ValueError, match=r"--lora_r 8 \(the run used 16\)"):
        resolve_merge_config(
            [f"--weight={run / 'pytorch_model.bin'}", "--save_path=o", "--lora_r=8"]
        )
    # equal values are fine
    config, _ = resolve_merge_config([f"--weight={run}/ckpt_model", "--save_path=o", "--lora_r=16"])
    assert config.lora_r == 16


def test_the_runs_vocabulary_is_merged_and_another_one_refused(tmp_path) -> None:
    run = write_run(tmp_path / "exp", vocabulary="lasagna")
    config, _ = resolve_merge_config([f"--weight={run / 'ckpt_model'}", "--save_path=o"])
    assert config.vocabulary == "lasagna" and config.model_config().vocabulary == "lasagna"
    with pytest.raises(ValueError, match=r"--vocabulary 'lisa' \(the run used 'lasagna'\)"):
        resolve_merge_config([f"--weight={run}/ckpt_model", "--save_path=o", "--vocabulary=lisa"])


def test_without_a_run_config_the_flags_are_used_as_given(tmp_path) -> None:
    (tmp_path / "w.bin").write_bytes(b"")
    config, _ = resolve_merge_config(
        [f"--weight={tmp_path / 'w.bin'}", "--save_path=o", "--lora_r=4", "--version=/v"]
    )
    assert config.lora_r == 4 and config.version == "/v"


def test_weight_is_required(capsys) -> None:
    with pytest.raises(SystemExit):
        resolve_merge_config(["--save_path=o"])
    assert "--weight is required" in capsys.readouterr().err
