"""Published checkpoints through the real scripts: LISA-, CoReS- and LaSagnA-format directories
evaluated with train_ds.py --eval_only, fine-tuned, merged and chatted with; a GSVA
training-time .bin over a LLaVA-v1 base evaluated on gRefCOCO. The tiny checkpoints are written
in the real layouts by the fidelity tests' writers (tests/model/test_layouts.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.e2e import python
from tests.model import test_layouts
from tests.model.test_layouts import GSVA_TOKENS, LORA_R, PROMPT_DIM, write_training_state_dict

# the fidelity tests' session fixture: tiny LLaVA-v1, LISA and M2SA directories, CLIP and SAM
legacy_assets = test_layouts.legacy_assets


def data_flags(assets: Path, runs: Path, exp_name: str, val_dataset: str) -> list[str]:
    return [
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
        f"--val_dataset={val_dataset}",
        "--precision=fp32",
        f"--out_dim={PROMPT_DIM}",
        "--workers=0",
        "--no-gradient_checkpointing",
    ]


def summary(run_dir: Path) -> dict:
    (path,) = run_dir.glob("eval_*.json")
    return json.loads(path.read_text())["summary"]


# per released family: its replica, its validation set and the metric that must be finite, the
# recipe flags its evaluation needs, and what its merged segmenter_config.json must keep
FAMILIES = {
    "lisa": ("ReasonSeg|val", "giou", [], {"vocabulary": "lisa"}),
    "cores": ("ReasonSeg|val", "giou", ["--recipe=cores"], {"vocabulary": "lisa"}),
    "lasagna": ("ade20k|val", "pixel_accuracy", ["--max_new_tokens=8"], {"vocabulary": "lasagna"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_released_directory_evaluates_fine_tunes_merges_and_chats(
    assets, legacy_assets, tmp_path, family
) -> None:
    """LISA-7B-v1, CoReS's cores7bft and LaSagnA-7B (all merged LISA-layout directories) through
    --eval_only on their paper's validation set, a fine-tune, the merge and chat; the merged
    copy keeps the family's chain token and vocabulary."""
    val_dataset, metric, recipe, kept = FAMILIES[family]
    directory, clip = getattr(legacy_assets, family).directory, legacy_assets.clip
    model_flags = [f"--version={directory}", f"--vision-tower={clip}", *recipe]
    flags = data_flags(assets, tmp_path, f"{family}-val", val_dataset)
    python("train_ds.py", *model_flags, *flags, "--eval_only")
    assert math.isfinite(summary(tmp_path / f"{family}-val")[metric])
    training = data_flags(assets, tmp_path, f"{family}-ft", "ReasonSeg|val") + [
        "--dataset=reason_seg||refer_seg",
        "--sample_rates=1,1",
        "--refer_seg_data=refcoco",
        "--batch_size=1",
        "--grad_accumulation_steps=1",
        "--epochs=1",
        "--steps_per_epoch=2",
        "--no_eval",
        f"--lora_r={LORA_R}",
    ]
    python("train_ds.py", *model_flags, *training)
    merged = tmp_path / f"{family}-ft-merged"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--weight={tmp_path / f'{family}-ft' / 'ckpt_model'}",
        f"--save_path={merged}",
    )
    assert (merged / "preprocessor_config.json").is_file()
    saved = json.loads((merged / "segmenter_config.json").read_text())
    assert {key: saved[key] for key in kept} == kept
    assert (saved["token_ids"].get("chain") is not None) == (family == "cores")
    image = sorted((assets / "dataset" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
    result = python(
        "chat.py",
        f"--version={merged}",
        "--precision=fp32",
        f"--image={image}",
        "--prompt=Please segment the red circle.",
        "--max_new_tokens=8",
        f"--vis_save_path={tmp_path / 'vis'}",
    )
    assert result.stdout.strip()


def test_a_gsva_bin_over_a_llava_v1_base_evaluates_on_grefcoco(
    assets, legacy_assets, tmp_path
) -> None:
    weight = tmp_path / "gsva-7b-ft-gres.bin"
    write_training_state_dict(weight, GSVA_TOKENS, "old")
    python(
        "train_ds.py",
        "--recipe=gsva",  # GSVA's architecture (no early fusion), as the README's line
        f"--version={legacy_assets.llava_v1.directory}",
        f"--vision-tower={legacy_assets.clip}",
        f"--vision_pretrained={legacy_assets.sam}",
        f"--weight={weight}",
        f"--lora_r={LORA_R}",
        *data_flags(assets, tmp_path, "gsva-val", "grefcoco|unc|val"),
        "--eval_only",
    )
    result = summary(tmp_path / "gsva-val")
    assert {"giou", "ciou", "n_acc", "t_acc"} <= set(result)
