"""Training-step benchmark: time per optimizer step split into data wait, forward, backward and
optimizer step, samples/s, the fraction of step time outside the model's forward/backward, and
(on an accelerator) peak memory and model-FLOPs utilisation. Prints JSON.

    python benchmarks/train_step.py [--preset tiny] [--steps 20] [--workers 4]
    python benchmarks/train_step.py --preset small [--batches 3] [--compare both]
    deepspeed --num_gpus 1 benchmarks/train_step.py --preset 7b [--offload_optimizer]

`--compare_full_logits` and `--compare_packing` (tiny, 7b) time as many steps again with full
logits, or with `--packing` flipped, adding "speedup" and "packing_speedup". The tiny preset's
"planner" holds the memory planner against the live-tensor peak (`planner_check`, below) of
PLANNER_BATCHES plain steps.

"tiny": the tiny model on the shapes-world assets, on CPU. "7b": a random-weight
LLaVA-7B-shaped backbone (LLaMA-7B, CLIP ViT-L/14 224 px) and SAM ViT-H, written to disk and
loaded through the real builder, bf16, ZeRO-2, gradient checkpointing (meant for a GPU; it
writes about 16 GB of random weights first). Both run the real data pipeline, DeepSpeed engine
and train_ds.py flags.

"small" (CPU) compares two paths on the same batches in one run: a LLaMA of width 1024, 8 layers
and a 32000-token vocabulary, a CLIP giving 256 image tokens, the m2sa recipe's mix and question
templates on the shapes-world assets, fp32; forward + backward of each batch on each path,
alternating. Its VQA dialogues (`--vqa_lengths llava_instruct`, the default) are lengthened to
LLaVA-Instruct-150K's text lengths, estimated from its published file sizes (`lengthen_vqa`; the
shapes world's own are about 50 tokens, `--vqa_lengths shapes`); the other families keep the
assets' lengths. `--compare logits` (default): trimmed against full logits (same dropout masks);
`--compare packing`: packed against padded language-model passes (`--packing`), both with
trimmed logits; `--compare both`: packed with trimmed logits against padded with full logits
(where a path packs, both run with dropout off: packing changes the dropout masks' shapes).
JSON: "speedup" (candidate over baseline samples/s), "max_abs_loss_diff", "vqa_lengths",
"vqa_text_tokens_mean" (over the assets' dialogues), "vqa_samples" (in the timed batches), and
per path the seconds per batch, the peak resident memory the step added, and `planner_check`:
the peak of live tensor bytes over each batch's forward and backward (`PeakTensors`) against the
memory planner's peak for that batch (`utils.memory_plan.activation_bytes` with the positions
the language model ran, packed or padded, the LM-head rows, the target pixels and the
gradients); "conversations" and "packed_rows" count the language-model rows without and with
packing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# DeepSpeed's logger binds the stdout of import time: import with stdout sent to stderr, so
# stdout carries the JSON alone
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.accelerator import get_accelerator  # noqa: E402

    from benchmarks.report import print_report  # noqa: E402
    from model.backbone import attention_layout, image_token_count  # noqa: E402
    from model.builder import build_segmenter  # noqa: E402
    from model.lora import parameter_group  # noqa: E402
    from model.packing import plan_packing, row_capacity  # noqa: E402
    from model.tiny import (  # noqa: E402
        CLIP_L14_224,
        LLAMA_7B,
        SMALL_TEXT,
        SMALL_VISION,
        SMALL_VOCAB,
        write_tiny_llava,
        write_tiny_sam,
    )
    from tools.make_tiny_assets import make_tiny_assets  # noqa: E402
    from utils.collate import SampleProcessor  # noqa: E402
    from utils.config import parse_args  # noqa: E402
    from utils.engine import init_engine  # noqa: E402
    from utils.flops import StepFlops, device_peak  # noqa: E402
    from utils.memory_plan import (  # noqa: E402
        StepGradients,
        activation_bytes,
        activation_shape,
    )
    from utils.training import (  # noqa: E402
        close_distributed,
        init_distributed,
        training_dataset,
        training_loader,
    )

SMALL_FLAGS = ["--precision=fp32", "--out_dim=32", "--lora_r=8", "--gradient_checkpointing"]
PRESET_FLAGS = {
    "tiny": ["--precision=fp32", "--out_dim=32", "--lora_r=4", "--no-gradient_checkpointing"],
    "7b": ["--precision=bf16", "--out_dim=256", "--lora_r=8", "--gradient_checkpointing"],
}
WARMUP_STEPS = 3
PLANNER_BATCHES = 3  # tiny: batches the planner is checked on
# small preset: per comparison, its two paths (baseline first) as Segmenter attributes
COMPARISONS = {
    "logits": {
        "full": {"full_logits": True, "packing": False},
        "trimmed": {"full_logits": False, "packing": False},
    },
    "packing": {
        "padded": {"full_logits": False, "packing": False},
        "packed": {"full_logits": False, "packing": True},
    },
    "both": {
        "padded_full": {"full_logits": True, "packing": False},
        "packed_trimmed": {"full_logits": False, "packing": True},
    },
}
# small preset, `--vqa_lengths llava_instruct`: LLaVA-Instruct-150K's three parts as (records,
# MB), the counts in the file names and the sizes in LLaVA's docs/Data.md, give bytes of JSON per
# record; BYTES_PER_TEXT_TOKEN (about 4 characters per LLaMA token, plus the JSON keys around
# each turn) turns them into the text tokens of a record: about 434, 178 and 207
LLAVA_INSTRUCT_PARTS = {
    "conversation_58k": (58_000, 126.0),
    "detail_23k": (23_000, 20.5),
    "complex_reasoning_77k": (77_000, 79.6),
}
BYTES_PER_TEXT_TOKEN = 5.0
LENGTH_SPREAD = (0.5, 1.5)  # a record's text tokens: its part's mean times a uniform draw
VQA_JSON = Path("llava_dataset") / "llava_instruct_150k.json"
BYTES_PER_GB = 2**30
TERA = 1e12


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*sorted(PRESET_FLAGS), "small"], default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--grad_accumulation_steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="train_ds.py's default")
    parser.add_argument("--offload_optimizer", action="store_true")
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="MFU's peak (default: utils.flops)"
    )
    parser.add_argument("--full_logits", action="store_true", help="the LM head everywhere")
    parser.add_argument(
        "--compare_full_logits",
        action="store_true",
        help="after the timed steps, time as many with full logits; adds 'speedup'",
    )
    parser.add_argument(
        "--packing",
        default=False,
        action=argparse.BooleanOptionalAction,
        help="tiny/7b: the padding-free language-model pass (train_ds.py's --packing)",
    )
    parser.add_argument(
        "--compare_packing",
        action="store_true",
        help="tiny/7b: then time as many steps with --packing flipped; adds 'packing_speedup' "
        "(packed over padded samples/s)",
    )
    parser.add_argument(
        "--compare", choices=sorted(COMPARISONS), default="logits", help="small: the two paths"
    )
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--batches", type=int, default=3, help="small: batches per path")
    parser.add_argument(
        "--vqa_lengths",
        choices=("llava_instruct", "shapes"),
        default="llava_instruct",
        help="small: VQA dialogues lengthened to LLaVA-Instruct-150K's estimated text tokens "
        "(default), or the shapes world's short ones",
    )
    parser.add_argument("--seed", type=int, default=0, help="small: assets and batches")
    parser.add_argument("--local_rank", type=int, default=0)
    return parser.parse_args()


def write_assets(preset: str, directory: Path) -> Path:
    """Shapes-world data plus the preset's random-weight LLaVA and SAM."""
    make_tiny_assets(directory, seed=0, image_size=(640, 480), models=preset == "tiny")
    if preset == "7b":
        write_tiny_llava(directory / "llava_tiny", text=LLAMA_7B, vision=CLIP_L14_224)
        write_tiny_sam(directory / "vision_pretrained" / "sam_tiny.pth", preset="vit_h")
    return directory


def train_config(args, assets: Path):
    flags = (
        PRESET_FLAGS[args.preset]
        + [
            f"--version={assets / 'llava_tiny'}",
            f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
            f"--dataset_dir={assets / 'dataset'}",
            "--refer_seg_data=refcoco||grefcoco",
            f"--batch_size={args.batch_size}",
            f"--grad_accumulation_steps={args.grad_accumulation_steps}",
            f"--workers={args.workers}",
            f"--steps_per_epoch={args.steps + WARMUP_STEPS}",
            "--epochs=1",
            f"--attn_implementation={args.attn_implementation}",
        ]
        + (["--offload_optimizer"] if args.offload_optimizer else [])
    )
    return parse_args(flags)


class Clock:
    """Wall time of code sections, synchronising the accelerator so kernels are counted."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.accelerator = get_accelerator()

    @contextlib.contextmanager
    def section(self, name: str):
        self.accelerator.synchronize()
        start = time.perf_counter()
        yield
        self.accelerator.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Counts:
    """What the timed steps processed: real tokens, padded slots, images, model FLOPs."""

    tokens: int = 0
    slots: int = 0
    images: int = 0
    flops: float = 0.0


def run_steps(engine, loader, config, steps: int, device, dtype) -> tuple[Clock, Counts]:
    """Time `steps` optimizer steps after WARMUP_STEPS; returns the clock and the counts."""
    clock, batches, counts = Clock(), iter(loader), Counts()
    flops = StepFlops.from_segmenter(engine.module)
    engine.train()
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            clock, counts = Clock(), Counts()
            get_accelerator().reset_peak_memory_stats()
        for _ in range(config.grad_accumulation_steps):
            with clock.section("data"):
                batch = next(batches).to(device, dtype)
            with clock.section("forward"):
                output = engine(batch)
            with clock.section("backward"):
                engine.backward(output.loss)
            with clock.section("step"):
                engine.step()
            lengths = batch.attention_mask.sum(dim=1).tolist()
            counts.tokens += sum(lengths)
            counts.slots += batch.attention_mask.numel()
            counts.images += batch.num_images
            counts.flops += flops.micro_batch(
                lengths, output.head_rows, batch.num_images, batch.patch_count
            )
    return clock, counts


def measure(args) -> dict:
    rank, world = init_distributed()
    try:
        return measure_in_group(args, rank, world)
    finally:
        close_distributed()


def measure_in_group(args, rank: int, world: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        assets = write_assets(args.preset, Path(scratch))
        config = train_config(args, assets)
        model, tokenizer = build_segmenter(config.model_config())
        model.full_logits = args.full_logits
        model.packing = args.packing
        processor = SampleProcessor.for_model(
            model, tokenizer, config.version, config.conv_type, config.model_max_length
        )
        dataset = training_dataset(config, processor, world, check=False)
        engine = init_engine(model, config, world)
        loader = training_loader(dataset, config, rank, world, model.token_ids.pad)
        device = get_accelerator().current_device_name()
        dtype = config.model_config().dtype

        def timed() -> dict:
            get_accelerator().reset_peak_memory_stats()
            steps = run_steps(engine, loader, config, args.steps, device, dtype)
            return summarise(args, config, model, *steps)

        result = timed()
        if args.preset == "tiny":
            result["planner"] = plain_planner_check(config, dataset)
        if args.compare_full_logits:
            model.full_logits = True
            result["full_logits"] = timed()
            result["speedup"] = result["samples_per_s"] / result["full_logits"]["samples_per_s"]
            model.full_logits = args.full_logits
        if args.compare_packing:
            model.packing = not args.packing
            other = timed()
            packed, padded = (result, other) if args.packing else (other, result)
            result["packed" if model.packing else "padded"] = other
            result["packing_speedup"] = packed["samples_per_s"] / padded["samples_per_s"]
    return result


def plain_planner_check(config, dataset) -> dict:
    """`planner_check` on PLANNER_BATCHES batches of `dataset` with a fresh model of the run's
    configuration, outside the engine (plain forward and backward, as the small preset)."""
    model, _ = build_segmenter(config.model_config())
    model.train()
    loader = training_loader(dataset, config, 0, 1, model.token_ids.pad)
    return planner_check(model, config, list(itertools.islice(loader, PLANNER_BATCHES)))


def summarise(args, config, model, clock: Clock, counts: Counts) -> dict:
    total = sum(clock.totals.values())
    per_step = {name: value / args.steps for name, value in clock.totals.items()}
    accelerator = get_accelerator()
    device = accelerator.current_device_name()
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "attn_implementation": config.attn_implementation,
        "full_logits": model.full_logits,
        "packing": model.packing,
        "image_tokens": image_token_count(model.llava.config),
        "seconds_per_step": total / args.steps,
        "seconds_per_step_by_part": per_step,
        "samples_per_s": counts.images / total,
        "data_wait_fraction": clock.totals["data"] / total,
        "outside_forward_backward_fraction": 1
        - (clock.totals["forward"] + clock.totals["backward"]) / total,
        "llm_tokens_per_s": counts.tokens / total,
        "padding_fraction": 1 - counts.tokens / counts.slots,
        "model_tflops_per_s": counts.flops / total / TERA,
        "workers": config.workers,
    }
    peak, note = (
        (args.peak_tflops * TERA, "--peak_tflops") if args.peak_tflops else device_peak(device)
    )
    if peak:
        result["model_flops_utilisation"] = counts.flops / total / peak
    result["mfu_against"] = note
    if accelerator.device_name() != "cpu":
        result["peak_memory_gb"] = accelerator.max_memory_allocated() / BYTES_PER_GB
    return result


# --- the "small" preset: trimmed against full logits ---
class PeakResident:
    """The most resident memory the process held above its level at entry, polled every
    POLL_SECONDS on a thread (torch's kernels release the GIL)."""

    POLL_SECONDS = 0.002

    def __enter__(self) -> PeakResident:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: a fair baseline
        self.baseline = self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.POLL_SECONDS)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @property
    def added(self) -> int:
        return self.peak - self.baseline


class PeakTensors(TorchDispatchMode):
    """The most bytes of tensor storage created inside the context that were alive at once:
    every op's new outputs (forward and backward, autograd's saved tensors and the gradients
    included; views of its inputs are no new storage) counted from creation until their storage
    is freed, checked after each op. The
    CPU's counterpart of an accelerator's max_memory_allocated over the step; unlike resident
    memory it holds no allocator caching or fragmentation. Slow: a separate, untimed pass."""

    def __enter__(self) -> PeakTensors:
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.bytes -= size
        inputs = {
            tensor.untyped_storage()._cdata
            for tensor in tree_flatten((args, kwargs))[0]
            if isinstance(tensor, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                # a view (of a weight, an input) allocates nothing
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.bytes += storage.nbytes()
        self.peak = max(self.peak, self.bytes)
        return out


def resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def llava_instruct_text_tokens(part: str) -> float:
    """The mean text tokens of a record of one LLaVA-Instruct-150K part (LLAVA_INSTRUCT_PARTS)."""
    records, megabytes = LLAVA_INSTRUCT_PARTS[part]
    return megabytes * 1e6 / records / BYTES_PER_TEXT_TOKEN


def text_tokens(tokenizer, turns: list[dict]) -> int:
    return sum(turn_tokens(tokenizer, turn) for turn in turns)


def turn_tokens(tokenizer, turn: dict) -> int:
    return len(tokenizer(turn["value"], add_special_tokens=False).input_ids)


def lengthen_answers(turns: list[dict], tokenizer, target: int) -> int:
    """Appends each answer's own text to the answers in turn until the dialogue's text holds at
    least `target` tokens (its questions, `<image>` and rounds unchanged); returns its tokens."""
    answers = [turn for turn in turns if turn["from"] == "gpt"]
    originals = [turn["value"] for turn in answers]
    others = text_tokens(tokenizer, [turn for turn in turns if turn["from"] != "gpt"])
    counts = [turn_tokens(tokenizer, turn) for turn in answers]
    for index in itertools.cycle(range(len(answers))):
        if others + sum(counts) >= target:
            return others + sum(counts)
        answers[index]["value"] += " " + originals[index]
        counts[index] = turn_tokens(tokenizer, answers[index])


def lengthen_vqa(dataset_dir: Path, tokenizer, seed: int) -> list[int]:
    """Rewrites the assets' llava_instruct_150k.json so each dialogue's text is as long as a
    LLaVA-Instruct-150K record's: a part drawn by its record count, its mean text tokens times
    a LENGTH_SPREAD draw. Returns the dialogues' text tokens."""
    path = dataset_dir / VQA_JSON
    records = json.loads(path.read_text())
    rng = random.Random(seed)
    parts = sorted(LLAVA_INSTRUCT_PARTS)
    weights = [LLAVA_INSTRUCT_PARTS[part][0] for part in parts]
    tokens = []
    for record in records:
        part = rng.choices(parts, weights)[0]
        target = round(llava_instruct_text_tokens(part) * rng.uniform(*LENGTH_SPREAD))
        tokens.append(lengthen_answers(record["conversations"], tokenizer, target))
    path.write_text(json.dumps(records))
    return tokens


def small_batches(args, assets: Path):
    """The small model (vocabulary grown to SMALL_VOCAB), `args.batches + 1` m2sa batches and
    the VQA dialogues' text tokens."""
    make_tiny_assets(assets, seed=args.seed, image_size=(640, 480), models=False)
    write_tiny_llava(assets / "llava_tiny", text=SMALL_TEXT, vision=SMALL_VISION)
    write_tiny_sam(assets / "vision_pretrained" / "sam_tiny.pth")
    config = parse_args(
        SMALL_FLAGS
        + [
            "--recipe=m2sa",
            f"--version={assets / 'llava_tiny'}",
            f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
            f"--dataset_dir={assets / 'dataset'}",
            f"--batch_size={args.batch_size}",
            "--workers=0",
            "--epochs=1",
            f"--seed={args.seed}",
        ]
    )
    torch.manual_seed(args.seed)
    model, tokenizer = build_segmenter(config.model_config())
    model.llava.resize_token_embeddings(SMALL_VOCAB)  # a real vocabulary's head and softmax
    if args.vqa_lengths == "llava_instruct":
        vqa_tokens = lengthen_vqa(assets / "dataset", tokenizer, args.seed)
    else:
        vqa_tokens = [text_tokens(tokenizer, r["conversations"]) for r in read_vqa(assets)]
    processor = SampleProcessor.for_model(
        model, tokenizer, config.version, config.conv_type, config.model_max_length
    )
    dataset = training_dataset(config, processor, 1, check=False)
    loader = training_loader(dataset, config, 0, 1, model.token_ids.pad)
    return config, model, list(itertools.islice(loader, args.batches + 1)), vqa_tokens


def read_vqa(assets: Path) -> list[dict]:
    return json.loads((assets / "dataset" / VQA_JSON).read_text())


def forward_backward(model, batch, seed: int) -> dict:
    """One forward and backward (fresh gradients, dropout seeded by `seed`): time, losses,
    the LM-head rows and the resident memory it added."""
    model.zero_grad(set_to_none=True)
    with PeakResident() as memory:
        torch.manual_seed(seed)
        start = time.perf_counter()
        output = model(batch)
        output.loss.backward()
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "loss": output.loss.item(),
        "head_rows": output.head_rows,
        "added_bytes": memory.added,
    }


def tensor_peak_bytes(model, batch, seed: int) -> tuple[int, int]:
    """`PeakTensors` over one forward and backward (fresh gradients, dropout seeded), and the
    LM-head rows of that forward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with PeakTensors() as tensors:
        output = model(batch)
        output.loss.backward()
    return tensors.peak, output.head_rows


def language_model_tokens(model, batch, attn_implementation: str) -> int:
    """Positions the language model runs on: the padded slots, or with `--packing` its packed
    rows times their width."""
    if not model.packing:
        return batch.input_ids.numel()
    lengths = batch.attention_mask.sum(dim=1).tolist()
    capacity = row_capacity(lengths, batch.input_ids.shape[1], attn_implementation)
    plan = plan_packing(lengths, capacity)
    return len(plan.rows) * plan.width


def planned_bytes(model, config, batch, head_rows: int) -> int:
    """The planner's peak for this batch's plain forward and backward: its language-model
    positions, LM-head rows and target pixels, with the trainable parameters' gradients."""
    shape = activation_shape(model, config)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = sum(count for name, count in trainable.items() if parameter_group(name) == "lm_head")
    gradients = StepGradients(
        head=head * shape.bytes_per_value, total=sum(trainable.values()) * shape.bytes_per_value
    )
    return activation_bytes(
        shape,
        language_model_tokens(model, batch, attention_layout(model.llava)),
        head_rows,
        config.gradient_checkpointing,
        target_pixels=sum(masks.numel() for masks in batch.gt_masks),
        gradients=gradients,
        output_holds_logits=model.uses_full_logits,
    )


def planner_check(model, config, batches) -> dict:
    """The planner against `PeakTensors` on each batch (plain forward and backward, dropout
    seeded): the largest of each over the batches, their ratio and the ratio per batch."""
    planned, measured = [], []
    for index, batch in enumerate(batches):
        peak, head_rows = tensor_peak_bytes(model, batch, seed=index)
        measured.append(peak)
        planned.append(planned_bytes(model, config, batch, head_rows))
    return {
        "planned_memory_gb": max(planned) / BYTES_PER_GB,
        "peak_tensor_memory_gb": max(measured) / BYTES_PER_GB,
        "planned_over_tensor_peak": max(planned) / max(measured),
        "planned_over_tensor_peak_by_batch": [
            plan / peak for plan, peak in zip(planned, measured, strict=True)
        ],
    }


def packed_rows(batch, attn_implementation: str) -> int:
    """The rows `--packing` packs this batch's conversations into."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    capacity = row_capacity(lengths, batch.input_ids.shape[1], attn_implementation)
    return len(plan_packing(lengths, capacity).rows)


def compare_paths(args) -> dict:
    """The two paths of `args.compare`, alternating on the same batches; the first batch warms
    up."""
    with tempfile.TemporaryDirectory() as scratch:
        config, model, batches, vqa_tokens = small_batches(args, Path(scratch))
    model.train()
    paths = COMPARISONS[args.compare]
    if any(settings["packing"] for settings in paths.values()):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        config = replace(config, lora_dropout=0.0)  # planned as it runs
    runs: dict[str, list[dict]] = {path: [] for path in paths}
    for index, batch in enumerate(batches):
        for path, settings in paths.items():
            for name, value in settings.items():
                setattr(model, name, value)
            run = forward_backward(model, batch, seed=index)
            if index:
                runs[path].append(run)
    timed = batches[1:]
    samples = sum(batch.num_images for batch in timed)
    tokens = sum(int(batch.attention_mask.sum()) for batch in timed)
    slots = sum(batch.attention_mask.numel() for batch in timed)
    result = {"preset": "small", "compare": args.compare, "batches": len(timed)}
    result["samples"] = samples
    result["padding_fraction"] = 1 - tokens / slots
    result["vqa_lengths"] = args.vqa_lengths
    result["vqa_text_tokens_mean"] = sum(vqa_tokens) / len(vqa_tokens)
    result["vqa_samples"] = sum(
        source.startswith("vqa/") for batch in timed for source in batch.sources
    )
    result["conversations"] = sum(batch.input_ids.shape[0] for batch in timed)
    layout = attention_layout(model.llava)
    result["packed_rows"] = sum(packed_rows(batch, layout) for batch in timed)
    for path, path_runs in runs.items():
        seconds = sum(run["seconds"] for run in path_runs)
        for name, value in paths[path].items():
            setattr(model, name, value)
        check = planner_check(model, config, timed)
        planned = check["planned_memory_gb"] * BYTES_PER_GB
        resident = max(run["added_bytes"] for run in path_runs)
        result[path] = {
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "seconds_per_batch": seconds / len(path_runs),
            "peak_added_memory_gb": resident / BYTES_PER_GB,
            "planned_over_measured": planned / resident,
            **check,
            "losses": [run["loss"] for run in path_runs],
        }
    baseline, candidate = (result[path] for path in paths)
    result["speedup"] = candidate["samples_per_s"] / baseline["samples_per_s"]
    result["max_abs_loss_diff"] = max(
        abs(a - b) for a, b in zip(candidate["losses"], baseline["losses"], strict=True)
    )
    return result


def main() -> None:
    args = parse()
    print_report(compare_paths if args.preset == "small" else measure, args)


if __name__ == "__main__":
    main()
