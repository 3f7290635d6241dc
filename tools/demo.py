"""`make demo`: the whole cycle on tiny models and shapes-world data, on a CPU, in minutes.

    .venv/bin/python tools/demo.py [--long] [--out DIR] [--epochs N] [--steps_per_epoch N]
        [--images_per_split N] [--master_port P] [--quiet]

1. writes the tiny assets (data in every real format, tiny LLaVA, tiny SAM) under DIR/assets;
2. evaluates the untrained model (`train_ds.py --eval_only`): MMR, gRefCOCO and ReasonSeg val;
3. trains with the real launcher, `deepspeed --num_gpus 2 train_ds.py`, on the default mix;
4. evaluates the trained model and compares it with the baselines (`tools/demo_report.py`);
5. consolidates the checkpoint (`zero_to_fp32.py`), merges LoRA into an HF checkpoint, and asks
   `chat.py` about two images (the target present, then absent);
6. writes DIR/summary.json, DIR/training_curve.png, and prints the tables, the outputs and
   every command it ran. `--long` is `make demo-long` (DIR = runs/demo-long, longer training).
The recipe (why these settings) is in docs/DEMO.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from tools import demo_report  # noqa: E402

PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
RANKS = 2
MASTER_PORT = 29571
REFERRING_SET = "grefcoco|unc|val"
MMR_SET = "MultiPartReasonSeg|val"
VAL_SETS = (MMR_SET, REFERRING_SET, "ReasonSeg|val")
VAL_JSON = "MMR_val.json"
CURVE_METRIC = "giou"
CHAT_QUESTION = "Please segment the {name} in this image."
CHAT_SCENE_SEED = 7
CHAT_MAX_TOKENS = 32
CHAT_SCENE_TRIES = 100
CHAT_OBJECTS = (3, 4)  # shapes per chat image (inclusive range)
VAL_BATCH_SIZE = 4
# what a previous demo left in DIR (appending TensorBoard events and metrics.jsonl lines to an
# old run would mix two runs' curves), removed before a new one starts; assets are rewritten
RUN_OUTPUTS = ("untrained", "train", "trained", "merged", "chat", "summary.json")


@dataclass(frozen=True)
class Profile:
    """One demo's settings: where it writes, the assets and the training recipe."""

    out: Path
    epochs: int
    steps_per_epoch: int
    images_per_split: int = 250
    image_size: int = 64
    seed: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    clip_steps: int = 1000
    llava_steps: int = 1600
    asset_flags: tuple[str, ...] = (
        "--absent_refs=3",
        "--model_preset=demo",
        "--pretrain_steps=500",
    )
    master_port: int = MASTER_PORT


MODEL_FLAGS = (
    "--precision=fp32",
    "--out_dim=64",
    "--lora_r=16",
    "--lora_alpha=32",
    "--lora_target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "--train_mm_projector",
    "--no-gradient_checkpointing",
    # the pretrained LLaVA answers "name: yes/no" where GSVA's answers put [SEG]/[REJ]
    "--new_token_init=[SEG]=yes,[REJ]=no",
    # the demo's model is tuned as LISA's architecture with mean-row new tokens, not the default
    # m2sa recipe's
    "--no-early_fusion",
    "--new_token_rows=mean",
)
DATA_FLAGS = (
    "--dataset=sem_seg||refer_seg||vqa||reason_seg||multi_part_reason_seg",
    "--refer_seg_data=refcoco||grefcoco",
    "--sample_rates=2,9,1,1,3",
    "--prompt_style=gsva",
    # the shapes world's unlabelled background stays out of the mask loss, and a part target is
    # a whole part category
    "--ignore_pixels=exclude",
    "--part_targets=category",
    "--workers=0",
)
PROFILES = {
    "demo": Profile(out=ROOT / "runs" / "demo", epochs=4, steps_per_epoch=400),
    "demo-long": Profile(
        out=ROOT / "runs" / "demo-long",
        epochs=5,
        steps_per_epoch=800,
        clip_steps=6000,
        llava_steps=6000,
    ),
}


class Runner:
    """Runs the demo's commands in the project root, showing their output, and keeps them."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.commands: list[tuple[str, str]] = []

    def __call__(
        self, title: str, command: list[str], cwd: Path = ROOT, processes: int = 1
    ) -> None:
        """Run `command` (in `cwd`; `processes` of them share the cores, see `threads`);
        SystemExit naming the step if it fails."""
        shown = shlex.join(_relative(part) for part in command)
        if cwd != ROOT:
            shown = f"(cd {_relative(str(cwd))} && {shown})"
        self.commands.append((title, shown))
        print(f"\n=== {title}\n$ {shown}", flush=True)
        output = subprocess.DEVNULL if self.quiet else None
        threads_each = os.environ.get("OMP_NUM_THREADS", threads(processes))
        env = {**os.environ, "OMP_NUM_THREADS": threads_each}
        result = subprocess.run(command, cwd=cwd, stdout=output, stderr=output, env=env)
        if result.returncode != 0:
            raise SystemExit(f"demo step '{title}' failed (exit {result.returncode}): {shown}")


def threads(processes: int = RANKS) -> str:
    """Threads per process: the cores shared among the processes (the launcher's ranks).
    PyTorch's default (every core in every rank) oversubscribes the CPU, and its spinning
    threads then make a tiny model's step many times slower."""
    return str(max(1, (os.cpu_count() or 1) // processes))


def _relative(text: str) -> str:
    """Paths under the project root written relative to it (commands a user can copy)."""
    return text.replace(str(ROOT) + "/", "")


def asset_command(profile: Profile) -> list[str]:
    return [
        PYTHON,
        "tools/make_tiny_assets.py",
        f"--out={profile.out / 'assets'}",
        f"--seed={profile.seed}",
        f"--image_size={profile.image_size}",
        f"--images_per_split={profile.images_per_split}",
        *profile.asset_flags,
        f"--clip_steps={profile.clip_steps}",
        f"--llava_steps={profile.llava_steps}",
    ]


def model_flags(profile: Profile) -> list[str]:
    assets = profile.out / "assets"
    return [
        f"--version={assets / 'llava_tiny'}",
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={profile.out}",
        f"--seed={profile.seed}",
        *MODEL_FLAGS,
    ]


def launcher(profile: Profile) -> list[str]:
    port = str(profile.master_port)
    return [DEEPSPEED, "--num_gpus", str(RANKS), "--master_port", port, "train_ds.py"]


def eval_command(profile: Profile, exp_name: str, weight: Path | None = None) -> list[str]:
    command = launcher(profile) + model_flags(profile)
    command += [
        f"--exp_name={exp_name}",
        f"--val_dataset={'||'.join(VAL_SETS)}",
        f"--val_json_name={VAL_JSON}",
        f"--val_batch_size={VAL_BATCH_SIZE}",
        "--eval_only",
    ]
    return command + ([f"--weight={weight}"] if weight else [])


def train_command(profile: Profile) -> list[str]:
    command = launcher(profile) + model_flags(profile) + list(DATA_FLAGS)
    return command + [
        "--exp_name=train",
        f"--val_dataset={REFERRING_SET}",
        f"--val_batch_size={VAL_BATCH_SIZE}",
        f"--batch_size={profile.batch_size}",
        "--grad_accumulation_steps=1",
        f"--lr={profile.lr}",
        f"--epochs={profile.epochs}",
        f"--steps_per_epoch={profile.steps_per_epoch}",
        "--no-auto_resume",
    ]


def read_evaluation(run_dir: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """({set: table metrics}, referring scores) from an --eval_only run's eval_*.json(l)."""
    from utils.datasets.validation import parse_val_datasets
    from utils.evaluation import job_name, safe_name

    metrics, referring = {}, {}
    for entry in parse_val_datasets("||".join(VAL_SETS)):
        name = job_name(entry, VAL_JSON)
        stem = run_dir / f"eval_{safe_name(name)}"
        summary = json.loads(stem.with_suffix(".json").read_text())["summary"]
        extra = None
        if name == REFERRING_SET:
            referring = demo_report.record_scores(
                demo_report.read_records(stem.with_suffix(".jsonl"))
            )
            extra = referring
        metrics[name] = demo_report.set_metrics(summary, extra)
    return metrics, referring


def chat_images(profile: Profile) -> tuple[Path, Path, str]:
    """Two demo images: one holding a shape, one without it; returns (present, absent, name)."""
    import numpy as np

    from tools.tiny_assets.common import write_jpeg
    from tools.tiny_assets.shapes_world import generate_scene

    rng = np.random.default_rng(CHAT_SCENE_SEED)
    side = profile.image_size
    present = generate_scene(rng, side, side, CHAT_OBJECTS)
    target = present.objects[0]
    for _ in range(CHAT_SCENE_TRIES):
        absent = generate_scene(rng, side, side, CHAT_OBJECTS)
        if not absent.has(target.colour, target.shape):
            break
    directory = profile.out / "chat"
    paths = directory / "present.jpg", directory / "absent.jpg"
    write_jpeg(paths[0], present.image)
    write_jpeg(paths[1], absent.image)
    return paths[0], paths[1], target.name


def write_app_examples(directory: Path, images: tuple[Path, ...], question: str) -> None:
    """`examples.json` beside the chat images: app.py's default examples ask the chat question."""
    examples = [{"image": path.name, "question": question} for path in images]
    (directory / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


def chat_commands(profile: Profile, merged: Path) -> list[list[str]]:
    present, absent, name = chat_images(profile)
    question = CHAT_QUESTION.format(name=name)
    write_app_examples(present.parent, (present, absent), question)
    return [
        [
            PYTHON,
            "chat.py",
            f"--version={merged}",
            "--precision=fp32",
            f"--max_new_tokens={CHAT_MAX_TOKENS}",
            f"--image={image}",
            f"--prompt={question}",
            f"--vis_save_path={profile.out / 'chat' / 'output'}",
        ]
        for image in (present, absent)
    ]


def baselines(profile: Profile, untrained_referring: dict[str, float]) -> dict[str, float]:
    images = demo_report.grefcoco_images(profile.out / "assets" / "dataset", "val")
    scores = demo_report.referring_baselines(images)
    return {"untrained": untrained_referring[demo_report.PRESENT_GIOU], **scores}


def clear_previous_run(out: Path) -> None:
    """Remove the outputs of an earlier demo in `out` (only the demo's own names)."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_cycle(profile: Profile, runner: Runner) -> dict:
    """Every step of the demo; returns the summary written to DIR/summary.json."""
    start = time.perf_counter()
    out = profile.out
    clear_previous_run(out)
    runner("write the tiny assets", asset_command(profile))
    runner("evaluate the untrained model", eval_command(profile, "untrained"), processes=RANKS)
    runner("train (DeepSpeed launcher, two CPU ranks)", train_command(profile), processes=RANKS)
    checkpoint = out / "train" / "ckpt_model"
    runner(
        "evaluate the trained model",
        eval_command(profile, "trained", checkpoint),
        processes=RANKS,
    )
    consolidated = out / "train" / "pytorch_model"
    runner(
        "consolidate the checkpoint",
        [PYTHON, "zero_to_fp32.py", ".", "../pytorch_model"],
        cwd=checkpoint,
    )
    merged = out / "merged"
    runner(
        "merge LoRA into a Hugging Face checkpoint",
        [
            PYTHON,
            "merge_lora_weights_and_save_hf_model.py",
            f"--version={out / 'assets' / 'llava_tiny'}",
            f"--weight={consolidated}",
            f"--save_path={merged}",
        ],
    )
    for index, command in enumerate(chat_commands(profile, merged)):
        runner(f"chat: image {index + 1} of 2", command)
    untrained, untrained_referring = read_evaluation(out / "untrained")
    trained, _ = read_evaluation(out / "trained")
    steps = profile.epochs * profile.steps_per_epoch
    extra = {
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "commands": [command for _, command in runner.commands],
    }
    summary = demo_report.build_summary(
        untrained,
        trained,
        {REFERRING_SET: baselines(profile, untrained_referring)},
        REFERRING_SET,
        extra,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run_dir = out / "train"
    demo_report.write_curve(
        out / "training_curve.png",
        demo_report.loss_curve(run_dir),
        demo_report.validation_curve(run_dir / "metrics.jsonl", REFERRING_SET, CURVE_METRIC),
        f"val gIoU ({REFERRING_SET})",
    )
    return summary


def report(profile: Profile, summary: dict, runner: Runner) -> str:
    """The closing text: tables, where each output is, and the commands that ran."""
    out = _relative(str(profile.out))
    lines = [
        "",
        "=== results (percent; teacher-forced, as the papers report)",
        demo_report.format_results(summary),
        "",
        f"=== learning against the baselines on {REFERRING_SET} "
        "(present targets; SEG/REJ decisions)",
        demo_report.format_baselines(summary, REFERRING_SET),
        "",
        f"=== outputs (the whole cycle took {summary['seconds'] / 60:.1f} min)",
        f"summary:          {out}/summary.json",
        f"training curve:   {out}/training_curve.png",
        f"TensorBoard:      tensorboard --logdir {out}/train",
        f"checkpoint:       {out}/train/ckpt_model (consolidated: {out}/train/pytorch_model)",
        f"merged model:     {out}/merged",
        f"chat overlays:    {out}/chat/output/*_overlay_*.png",
        f"evaluations:      {out}/untrained/eval_*.json, {out}/trained/eval_*.json(l)",
        "",
        "=== commands (swap in real paths: --version, --vision_pretrained, --dataset_dir)",
        f"# the launcher's ranks ran with OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', threads())} (the cores shared among the ranks)",
    ]
    lines += [f"# {title}\n{command}" for title, command in runner.commands]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="make demo-long's longer training")
    parser.add_argument("--out", type=Path, help="output directory (default runs/demo[-long])")
    parser.add_argument("--epochs", type=int, help="epochs, each ending with a validation")
    parser.add_argument("--steps_per_epoch", type=int, help="optimizer steps per epoch")
    parser.add_argument("--images_per_split", type=int, help="images per split of the assets")
    parser.add_argument("--master_port", type=int, help="DeepSpeed's port (two demos at once)")
    parser.add_argument("--quiet", action="store_true", help="hide the commands' own output")
    return parser.parse_args(argv)


def profile_from(args: argparse.Namespace) -> Profile:
    profile = PROFILES["demo-long" if args.long else "demo"]
    overrides = {
        "out": args.out.resolve() if args.out else None,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "images_per_split": args.images_per_split,
        "master_port": args.master_port,
    }
    return replace(profile, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    profile = profile_from(args)
    runner = Runner(args.quiet)
    summary = run_cycle(profile, runner)
    print(report(profile, summary, runner), flush=True)
    return summary


if __name__ == "__main__":
    main()
