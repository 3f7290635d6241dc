"""Helpers of the end-to-end tests: train_ds.py flags for the tiny assets, running the real
scripts, the DeepSpeed launcher on two CPU ranks, and reading TensorBoard scalars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL_DATASETS = "grefcoco|unc|val||MultiPartReasonSeg|val"
LAUNCHER_PORT = 29561

MMR_README_FLAGS = [
    "--dataset=sem_seg||refer_seg||vqa||multi_part_reason_seg",
    "--vision-tower=openai/clip-vit-large-patch14",
    "--batch_size=2",
    "--num_classes_per_sample=3",
    "--num_classes_per_question=3",
    "--use_expand_question_list",
    "--model_max_length",
    "2048",
    "--sample_rates=2,9,2,6",
    "--val_dataset=MultiPartReasonSeg|val",
    "--val_json_name=MMR_val.json",
]


# what a tiny launcher run changes from a recipe: the tiny models' precision and LoRA, a short
# schedule (the recipe and custom-data cycle tests)
SHORT_RUN_FLAGS = (
    "--precision=fp32",
    "--lora_r=4",
    "--workers=0",
    "--no-gradient_checkpointing",
    "--batch_size=2",
    "--grad_accumulation_steps=1",
    "--epochs=1",
    "--steps_per_epoch=3",
    "--lr=0.001",
)


def tiny_flags(assets: Path, runs: Path, exp_name: str) -> list[str]:
    """train_ds.py flags for the tiny assets (fp32, small LoRA, no workers)."""
    return [
        f"--version={assets / 'llava_tiny'}",
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
        "--refer_seg_data=refcoco||grefcoco",
        f"--val_dataset={VAL_DATASETS}",
        "--val_json_name=MMR_val.json",
        "--precision=fp32",
        "--out_dim=32",
        "--lora_r=4",
        "--workers=0",
        "--no-gradient_checkpointing",
        "--lr=0.001",
    ]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in the project root; assert success, showing the output's tail if not."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def python(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, script, *args], timeout)


def launch_two_ranks(
    assets: Path, runs: Path, exp_name: str, zero_stage: int, extra: tuple[str, ...] = ()
) -> Path:
    """`deepspeed --num_gpus 2 train_ds.py` with the MMR README's flags, 2 epochs of 4 steps,
    and `extra` flags. Returns the run directory."""
    flags = (
        tiny_flags(assets, runs, exp_name)
        + MMR_README_FLAGS
        + [
            "--grad_accumulation_steps=1",
            "--epochs=2",
            "--steps_per_epoch=4",
            f"--zero_stage={zero_stage}",
            *extra,
        ]
    )
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(LAUNCHER_PORT)]
    run([*command, "train_ds.py", *flags], 900)
    return runs / exp_name


def consolidate(checkpoint: Path, out: Path) -> None:
    """The README's `zero_to_fp32.py` line, run where it says (cd ckpt_model): the run's
    DeepSpeed checkpoint -> a consolidated fp32 state dict at `out`."""
    result = subprocess.run(
        [sys.executable, "zero_to_fp32.py", ".", str(out)],
        cwd=checkpoint,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]
