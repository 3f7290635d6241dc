"""`make demo`: the whole cycle on tiny models and shapes-world data, on a CPU, in minutes.

    .venv/bin/python tools/demo.py [--long] [--out DIR] [--seed S] [--epochs N]
        [--steps_per_epoch N] [--images_per_split N] [--master_port P] [--quiet]
        [--backbone llava|qwen2_5_vl|qwen3_vl] [--segmenter sam|sam2]
    .venv/bin/python tools/demo.py --base_models      (`make demo-assets`)

1. writes the tiny dataset (every real format) under DIR/assets; the models start from the
   pretrained tiny base models shipped in demo_assets/ (as a real run starts from a downloaded
   LLaVA and SAM);
2. evaluates the untrained model (`train_ds.py --eval_only`): MMR, gRefCOCO and ReasonSeg val;
3. trains with the real launcher, `deepspeed --num_gpus 2 train_ds.py`, on the default mix;
4. evaluates the trained model and compares it with the baselines (`tools/demo_report.py`);
5. consolidates the checkpoint (`zero_to_fp32.py`), merges LoRA into an HF checkpoint, and asks
   `chat.py` about two images (the target present, then absent), then the same question about
   CHAT_PROBE_PAIRS more such pairs, whose answers give the rates of its one-name decisions;
6. writes DIR/summary.json (with the chat answers and the present target's mask IoU),
   DIR/training_curve.png, and prints the tables, the outputs and every command it ran.
`--long` is `make demo-long` (DIR = runs/demo-long, 4 epochs of 800 steps instead of 3 of 600).
`--backbone` / `--segmenter` run the same cycle on another tiny backbone or mask model
(`tools/make_tiny_assets.py` writes them with the assets, random weights in their released
formats: no pretrained base models exist for them, so the learning criterion is for the
default pair, the shipped LLaVA and SAM).
`--base_models` (`make demo-assets`) reproduces demo_assets/: the tiny LLaVA and SAM pretrained
by `tools/make_tiny_assets.py` (BASE_PRETRAINING), SAM converted to safetensors, and
demo_assets/base_models.json naming the command and each file's SHA-256.
The recipe (why these settings) is in docs/DEMO.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from tools import demo_report  # noqa: E402
from tools.make_tiny_assets import (  # noqa: E402
    BACKBONES,
    DEFAULT_BACKBONE,
    DEFAULT_SEGMENTER,
    SEGMENTERS,
)
from utils.datasets.templates import GSVA_QUESTIONS  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

    from tools.tiny_assets.shapes_world import Scene

PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
RANKS = 2
MASTER_PORT = 29571
REFERRING_SET = "grefcoco|unc|val"
MMR_SET = "MultiPartReasonSeg|val"
VAL_SETS = (MMR_SET, REFERRING_SET, "ReasonSeg|val")
VAL_JSON = "MMR_val.json"
CURVE_METRIC = "giou"
# chat asks in the form only GSVA's answers follow ("What are {x} in this image? Please output
# segmentation masks."): the training data answers it "x:[SEG]" or "x:[REJ]", while LISA's
# single-name questions ("Please segment the x in this image.", ReasonSeg's phrases) are
# always answered [SEG]
CHAT_QUESTION = GSVA_QUESTIONS[3]
CHAT_SCENE_SEED = 7
CHAT_MAX_TOKENS = 32
CHAT_SCENE_TRIES = 1000
# more chat pairs (present, near-miss absent), asked the chat question: the rates of the chat's
# one-name decisions, of which the chat's own pair is one draw
CHAT_PROBE_PAIRS = 30
PROBE_SCENE_SEED = CHAT_SCENE_SEED + 1
PROBE_DIR = "probe"
CHAT_OBJECTS = (3, 4)  # shapes per chat image (inclusive range)
CHAT_REQUESTS, CHAT_ANSWERS = "requests.jsonl", "answers.jsonl"
CHAT_TRUTH = "present_target.png"
CHAT_STRIP = "chat_strip.png"
CHAT_MIN_IOU = 0.5  # issue 20: the present target's chat mask against its ground truth
MASK_ON = 255
VAL_BATCH_SIZE = 4
# the pretrained tiny base models `make demo` starts from (`make demo-assets` writes them)
BASE_MODELS = ROOT / "demo_assets"
BASE_LLAVA = "llava_tiny"
BASE_SAM = Path("vision_pretrained") / "sam_tiny.safetensors"
BASE_MANIFEST = "base_models.json"
BASE_SEED = 0
# make_tiny_assets' pretraining of the base models
BASE_PRETRAINING = (
    "--model_preset=demo",
    "--pretrain_steps=500",
    "--clip_steps=6000",
    "--llava_steps=6000",
)
# what a previous demo left in DIR (appending TensorBoard events and metrics.jsonl lines to an
# old run would mix two runs' curves), removed before a new one starts; assets are rewritten
RUN_OUTPUTS = ("untrained", "train", "trained", "merged", "chat", "summary.json")


@dataclass(frozen=True)
class Profile:
    """One demo's settings: where it writes, the assets and the training recipe, and the
    directory of pretrained base models it starts from."""

    out: Path
    epochs: int
    steps_per_epoch: int
    base_models: Path = BASE_MODELS
    images_per_split: int = 250
    image_size: int = 64
    seed: int = 0
    batch_size: int = 8
    lr: float = 2e-3
    asset_flags: tuple[str, ...] = ("--absent_refs=3",)
    master_port: int = MASTER_PORT
    backbone: str = DEFAULT_BACKBONE
    segmenter: str = DEFAULT_SEGMENTER

    @property
    def from_base_models(self) -> bool:
        """The default pair starts from the shipped pretrained base models; any other from the
        tiny random models written with the assets."""
        return (self.backbone, self.segmenter) == (DEFAULT_BACKBONE, DEFAULT_SEGMENTER)


MODEL_FLAGS = (
    "--precision=fp32",
    "--lora_r=16",
    "--lora_alpha=32",
    "--lora_target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "--train_mm_projector",
    "--no-gradient_checkpointing",
    # the demo's model is tuned as LISA's architecture with mean-row new tokens, not the default
    # m2sa recipe's
    "--no-early_fusion",
    "--new_token_rows=mean",
)
# the base models' own: the demo SAM's width; the pretrained LLaVA answers "name: yes/no" where
# GSVA's answers put [SEG]/[REJ]
BASE_MODEL_FLAGS = ("--out_dim=64", "--new_token_init=[SEG]=yes,[REJ]=no")
# the tiny random models' prompt width (model.tiny: SAM's and SAM 2's tiny presets)
TINY_MODEL_FLAGS = ("--out_dim=32",)
DATA_FLAGS = (
    "--dataset=sem_seg||refer_seg||vqa||reason_seg||multi_part_reason_seg",
    # the decision is learned where it is measured: gRefCOCO's no-target expressions make about
    # a quarter of the training decisions answered [REJ] (under a tenth with refcoco beside it),
    # and lists of 1 to 20 expressions per image (`--refer_draw varied`, all-absent draws kept)
    # prepare both the long lists of its validation (10-26 names per conversation) and the
    # chat's one-name question, answered [REJ] when its target is absent (GSVA's loader draws
    # a fixed count and never asks it); every family still trains
    "--refer_seg_data=grefcoco",
    "--sample_rates=1,12,1,1,1",
    "--num_classes_per_sample=20",
    "--refer_draw=varied",
    "--prompt_style=gsva",
    # every answer in GSVA's form "Sure, they are a:[SEG], b:[REJ].": the form its validation
    # answers are read in, and where the pretrained LLaVA answers "a: yes, b: no"; after its
    # other four forms the decision has to be learned anew and stays weaker (docs/DEMO.md, Z)
    "--gsva_answer_form=colon",
    # the shapes world's unlabelled background stays out of the mask loss, and a part target is
    # a whole part category
    "--ignore_pixels=exclude",
    "--part_targets=category",
    "--workers=0",
)
# lists of 1 to 20 names are 42 % padding: packed training steps are 12 % faster
TRAIN_FLAGS = ("--packing",)
PROFILES = {
    "demo": Profile(out=ROOT / "runs" / "demo", epochs=3, steps_per_epoch=600),
    "demo-long": Profile(out=ROOT / "runs" / "demo-long", epochs=4, steps_per_epoch=800),
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


def make_assets_command(out: Path, seed: int, image_size: int, *flags: str) -> list[str]:
    """tools/make_tiny_assets.py writing under `out` with square images."""
    return [
        PYTHON,
        "tools/make_tiny_assets.py",
        f"--out={out}",
        f"--seed={seed}",
        f"--image_size={image_size}",
        *flags,
    ]


def asset_command(profile: Profile) -> list[str]:
    """The dataset (the models come from the base models), and for another backbone or mask
    model the tiny random ones."""
    if profile.from_base_models:
        models = ["--no-models"]
    else:
        models = [f"--backbone={profile.backbone}", f"--segmenter={profile.segmenter}"]
    return make_assets_command(
        profile.out / "assets",
        profile.seed,
        profile.image_size,
        f"--images_per_split={profile.images_per_split}",
        *profile.asset_flags,
        *models,
    )


def model_paths(profile: Profile) -> tuple[Path, Path]:
    """(--version, --vision_pretrained) of the models the demo starts from."""
    if profile.from_base_models:
        return profile.base_models / BASE_LLAVA, profile.base_models / BASE_SAM
    from model.tiny import TINY_SEGMENTERS

    assets = profile.out / "assets"
    return (
        assets / f"{profile.backbone}_tiny",
        assets / "vision_pretrained" / TINY_SEGMENTERS[profile.segmenter][0],
    )


def check_base_models(directory: Path) -> None:
    """SystemExit unless `directory` holds the base models its manifest lists, byte for byte."""
    manifest = directory / BASE_MANIFEST
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: run `make demo-assets` to write the base models")
    for name, digest in json.loads(manifest.read_text())["sha256"].items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            raise SystemExit(
                f"{path}: missing or not the file {manifest.name} lists (SHA-256 {digest}); "
                "restore it with git or rewrite all of them with `make demo-assets`"
            )


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain_command(out: Path) -> list[str]:
    """make_tiny_assets writing only the pretrained base models under `out`."""
    image_size = PROFILES["demo"].image_size
    return make_assets_command(out, BASE_SEED, image_size, "--families=", *BASE_PRETRAINING)


def write_base_models(runner: Runner, directory: Path = BASE_MODELS) -> dict:
    """`make demo-assets`: pretrain the tiny base models (`pretrain_command`) and install them
    in `directory`; returns the manifest written."""
    with tempfile.TemporaryDirectory() as scratch:
        command = pretrain_command(Path(scratch))
        runner("pretrain the tiny base models", command)
        return install_base_models(Path(scratch), directory, command)


def install_base_models(source: Path, directory: Path, command: list[str]) -> dict:
    """Copy make_tiny_assets' models from `source` to `directory` (LLaVA as it is, SAM converted
    to safetensors) and write the manifest: the command (its output directory as OUT) and each
    file's SHA-256. Returns the manifest."""
    from safetensors.torch import save_file

    from model.tensor_files import read_tensor_file

    shutil.rmtree(directory / BASE_LLAVA, ignore_errors=True)
    shutil.copytree(source / BASE_LLAVA, directory / BASE_LLAVA)
    state = read_tensor_file(source / "vision_pretrained" / "sam_tiny.pth")
    (directory / BASE_SAM).parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, directory / BASE_SAM)
    files = sorted(path for path in (directory / BASE_LLAVA).rglob("*") if path.is_file())
    manifest = {
        "command": _relative(shlex.join(command)).replace(str(source), "OUT"),
        "sha256": {
            str(path.relative_to(directory)): file_sha256(path)
            for path in [*files, directory / BASE_SAM]
        },
    }
    (directory / BASE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def model_flags(profile: Profile) -> list[str]:
    assets = profile.out / "assets"
    version, sam = model_paths(profile)
    return [
        f"--version={version}",
        f"--vision_pretrained={sam}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={profile.out}",
        f"--seed={profile.seed}",
        *MODEL_FLAGS,
        *(BASE_MODEL_FLAGS if profile.from_base_models else TINY_MODEL_FLAGS),
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
    command = launcher(profile) + model_flags(profile) + list(DATA_FLAGS) + list(TRAIN_FLAGS)
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
    """Two demo images: one holding a shape, one without it, written to DIR/chat with the
    present image's ground truth for the named shape (`present_target.png`: every object of its
    colour and shape). Returns (present, absent, name)."""
    import numpy as np

    from tools.tiny_assets.common import write_jpeg

    rng = np.random.default_rng(CHAT_SCENE_SEED)
    present, absent = chat_pair(rng, profile.image_size)
    target = present.objects[0]
    directory = profile.out / "chat"
    paths = directory / "present.jpg", directory / "absent.jpg"
    write_jpeg(paths[0], present.image)
    write_jpeg(paths[1], absent.image)
    same = [o.mask for o in present.objects if (o.colour, o.shape) == (target.colour, target.shape)]
    truth = np.any(same, axis=0).astype(np.uint8) * MASK_ON
    cv2_write(directory / CHAT_TRUTH, truth)
    return paths[0], paths[1], target.name


def chat_pair(rng: np.random.Generator, side: int) -> tuple[Scene, Scene]:
    """(present, absent) scenes: a random scene, whose first object the chat names, and a scene
    without that object's colour and shape together that holds an object of its colour and one
    of its shape, the way the assets' absent expressions are absent (the colour of one object
    with the shape of another, `absent_kind`), so the chat asks what training asked. A present
    scene whose target has no such scene within CHAT_SCENE_TRIES is drawn again."""
    from tools.tiny_assets.shapes_world import generate_scene

    for _ in range(CHAT_SCENE_TRIES):
        present = generate_scene(rng, side, side, CHAT_OBJECTS)
        target = present.objects[0]
        absent = near_miss_scene(rng, side, target.colour, target.shape)
        if absent is not None:
            return present, absent
    raise SystemExit(f"no {side}x{side} chat scenes with a near miss in {CHAT_SCENE_TRIES} tries")


def near_miss_scene(rng: np.random.Generator, side: int, colour: str, shape: str) -> Scene | None:
    """A scene without a `colour` `shape` holding an object of that colour and one of that
    shape, or None if CHAT_SCENE_TRIES scenes hold none."""
    from tools.tiny_assets.shapes_world import generate_scene

    for _ in range(CHAT_SCENE_TRIES):
        scene = generate_scene(rng, side, side, CHAT_OBJECTS)
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        if not scene.has(colour, shape) and colour in colours and shape in shapes:
            return scene
    return None


def probe_command(profile: Profile, merged: Path) -> list[str]:
    """chat.py in batch mode on CHAT_PROBE_PAIRS more chat pairs (DIR/chat/probe: present then
    absent image of each pair, asked the chat question about the present one's first object),
    whose answers give the rates of the chat's one-name decisions (`probe_results`)."""
    import numpy as np

    from tools.tiny_assets.common import write_jpeg

    directory = profile.out / "chat" / PROBE_DIR
    rng = np.random.default_rng(PROBE_SCENE_SEED)
    requests = []
    for index in range(CHAT_PROBE_PAIRS):
        present, absent = chat_pair(rng, profile.image_size)
        question = CHAT_QUESTION.format(x=f"the {present.objects[0].name}")
        for kind, scene in (("present", present), ("absent", absent)):
            path = directory / f"{index:02d}_{kind}.jpg"
            write_jpeg(path, scene.image)
            requests.append({"image": str(path), "prompt": question})
    return chat_py(merged, directory, requests)


def cv2_write(path: Path, image) -> None:
    import cv2

    if not cv2.imwrite(str(path), image):
        raise SystemExit(f"could not write {path}")


def write_app_examples(directory: Path, images: tuple[Path, ...], question: str) -> None:
    """`examples.json` beside the chat images: app.py's default examples ask the chat question."""
    examples = [{"image": path.name, "question": question} for path in images]
    (directory / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


def chat_command(profile: Profile, merged: Path) -> list[str]:
    """chat.py in batch mode on the two chat images (`requests.jsonl` -> `answers.jsonl`)."""
    present, absent, name = chat_images(profile)
    question = CHAT_QUESTION.format(x=f"the {name}")
    write_app_examples(present.parent, (present, absent), question)
    directory = profile.out / "chat"
    requests = [{"image": str(image), "prompt": question} for image in (present, absent)]
    return chat_py(merged, directory, requests)


def chat_py(merged: Path, directory: Path, requests: list[dict]) -> list[str]:
    """chat.py in batch mode on `requests` ({image, prompt}), written to DIR/requests.jsonl:
    answers to DIR/answers.jsonl, overlays to DIR/output."""
    (directory / CHAT_REQUESTS).write_text(
        "".join(json.dumps(request) + "\n" for request in requests)
    )
    return [
        PYTHON,
        "chat.py",
        f"--version={merged}",
        "--precision=fp32",
        f"--max_new_tokens={CHAT_MAX_TOKENS}",
        f"--input_jsonl={directory / CHAT_REQUESTS}",
        f"--output_jsonl={directory / CHAT_ANSWERS}",
        f"--vis_save_path={directory / 'output'}",
    ]


def read_chat_answers(directory: Path) -> list[dict]:
    """chat.py's records of DIR/answers.jsonl (DIR/chat: the present image's, then the
    absent's; DIR/chat/probe: pair by pair, the same)."""
    return [json.loads(line) for line in (directory / CHAT_ANSWERS).read_text().splitlines()]


def rejected(answer: dict) -> bool:
    """Whether chat.py answered every target of a record `[REJ]` (and named at least one)."""
    return bool(answer["targets"]) and not any(t["present"] for t in answer["targets"])


def segmented(answer: dict) -> bool:
    """Whether chat.py answered a record with at least one `[SEG]` mask."""
    return any(t["present"] for t in answer["targets"])


def probe_results(directory: Path) -> dict:
    """The chat's one-name decisions over the probe pairs (DIR/chat/probe/answers.jsonl):
    how many present images got a `[SEG]` mask and how many absent ones every target `[REJ]`."""
    answers = read_chat_answers(directory)
    present, absent = answers[0::2], answers[1::2]
    return {
        "pairs": len(present),
        "present_segmented": sum(segmented(answer) for answer in present),
        "absent_rejected": sum(rejected(answer) for answer in absent),
    }


def chat_results(directory: Path) -> dict:
    """What chat.py answered (DIR/chat/answers.jsonl): on the present image the IoU of its
    first `[SEG]` mask with the ground truth (0 without one), on the absent image whether every
    target was answered `[REJ]`; "met" when the IoU reaches CHAT_MIN_IOU and the absent target
    is rejected."""
    import cv2

    present, absent = read_chat_answers(directory)
    truth = cv2.imread(str(directory / CHAT_TRUTH), cv2.IMREAD_GRAYSCALE) > 0
    masks = [target["mask"] for target in present["targets"] if target["present"]]
    iou = demo_report.iou(cv2.imread(masks[0], cv2.IMREAD_GRAYSCALE) > 0, truth) if masks else 0.0
    return {
        "question": present["prompt"],
        "present": {"answer": present["text"], "iou": iou},
        "absent": {"answer": absent["text"], "rejected": rejected(absent)},
        "met": iou >= CHAT_MIN_IOU and rejected(absent),
        "probe": probe_results(directory / PROBE_DIR),
    }


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
    if profile.from_base_models:
        check_base_models(profile.base_models)
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
            f"--version={model_paths(profile)[0]}",
            f"--weight={consolidated}",
            f"--save_path={merged}",
        ],
    )
    runner("chat: the target present, then absent", chat_command(profile, merged))
    runner(
        f"chat: {CHAT_PROBE_PAIRS} more pairs, for the rates of its decisions",
        probe_command(profile, merged),
    )
    untrained, untrained_referring = read_evaluation(out / "untrained")
    trained, _ = read_evaluation(out / "trained")
    steps = profile.epochs * profile.steps_per_epoch
    extra = {
        "steps": steps,
        "seed": profile.seed,
        "base_models": _relative(str(profile.base_models)) if profile.from_base_models else None,
        "models": {"backbone": profile.backbone, "segmenter": profile.segmenter},
        "chat": chat_results(out / "chat"),
        "chat_strip": _relative(
            str(write_chat_strip(out / "chat", read_chat_answers(out / "chat")))
        ),
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
        *chat_lines(summary["chat"]),
        "",
        f"=== outputs (the whole cycle took {summary['seconds'] / 60:.1f} min)",
        f"summary:          {out}/summary.json",
        f"training curve:   {out}/training_curve.png",
        f"TensorBoard:      tensorboard --logdir {out}/train",
        f"checkpoint:       {out}/train/ckpt_model (consolidated: {out}/train/pytorch_model)",
        f"merged model:     {out}/merged",
        f"chat answers:     {out}/chat/answers.jsonl (overlays: {out}/chat/output/, "
        f"side by side: {out}/chat/{CHAT_STRIP})",
        f"evaluations:      {out}/untrained/eval_*.json, {out}/trained/eval_*.json(l)",
        "",
        "=== commands (swap in real paths: --version, --vision_pretrained, --dataset_dir)",
        f"# the launcher's ranks ran with OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', threads())} (the cores shared among the ranks)",
    ]
    lines += [f"# {title}\n{command}" for title, command in runner.commands]
    return "\n".join(lines)


def write_chat_strip(directory: Path, answers: list[dict]) -> Path:
    """DIR/chat/chat_strip.png: each chat image beside its first overlay (the image again when
    the answer has no [SEG]), the question underneath (the README's demo picture)."""
    import cv2

    pictures = []
    for answer in answers:
        image = cv2.imread(answer["image"])
        overlays = [t["overlay"] for t in answer["targets"] if t["present"]]
        pictures += [image, cv2.imread(overlays[0]) if overlays else image]
    captions = ["present | overlay | absent | overlay", f'"{answers[0]["prompt"]}"']
    return demo_report.write_chat_strip(directory / CHAT_STRIP, pictures, captions)


def chat_lines(chat: dict) -> list[str]:
    """The chat answers under the report's tables."""
    verdict = "met" if chat["met"] else "NOT met"
    rejected = "yes" if chat["absent"]["rejected"] else "no"
    probe = chat["probe"]
    return [
        f"=== chat.py on two new images: {chat['question']}",
        f"target present: {chat['present']['answer']!r}  mask IoU {chat['present']['iou']:.3f}",
        f"target absent:  {chat['absent']['answer']!r}  answered [REJ]: {rejected}",
        f"chat (IoU >= {CHAT_MIN_IOU} and [REJ] when absent): {verdict}",
        f"the same question on {probe['pairs']} more pairs: [SEG] on "
        f"{probe['present_segmented']}/{probe['pairs']} present images, [REJ] on "
        f"{probe['absent_rejected']}/{probe['pairs']} absent ones",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--long", action="store_true", help="make demo-long: 4 epochs of 800 steps, not 3 of 600"
    )
    parser.add_argument(
        "--base_models",
        action="store_true",
        help="make demo-assets: pretrain the base models again into demo_assets/",
    )
    parser.add_argument("--out", type=Path, help="output directory (default runs/demo[-long])")
    parser.add_argument("--seed", type=int, help="seed of the dataset and the training run")
    parser.add_argument("--epochs", type=int, help="epochs, each ending with a validation")
    parser.add_argument("--steps_per_epoch", type=int, help="optimizer steps per epoch")
    parser.add_argument("--images_per_split", type=int, help="images per split of the assets")
    parser.add_argument("--master_port", type=int, help="DeepSpeed's port (two demos at once)")
    parser.add_argument("--quiet", action="store_true", help="hide the commands' own output")
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        help="another tiny backbone (random weights; default: the shipped pretrained LLaVA)",
    )
    parser.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        help="another tiny mask model (random weights; default: the shipped pretrained SAM)",
    )
    return parser.parse_args(argv)


def profile_from(args: argparse.Namespace) -> Profile:
    profile = PROFILES["demo-long" if args.long else "demo"]
    overrides = {
        "out": args.out.resolve() if args.out else None,
        "seed": args.seed,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "images_per_split": args.images_per_split,
        "master_port": args.master_port,
        "backbone": args.backbone,
        "segmenter": args.segmenter,
    }
    return replace(profile, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runner = Runner(args.quiet)
    if args.base_models:
        manifest = write_base_models(runner)
        print(json.dumps(manifest, indent=2), flush=True)
        return manifest
    profile = profile_from(args)
    summary = run_cycle(profile, runner)
    print(report(profile, summary, runner), flush=True)
    return summary


if __name__ == "__main__":
    main()
