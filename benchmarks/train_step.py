"""Training-step benchmark: time per optimizer step split into data wait, forward, backward and
optimizer step, samples/s, the fraction of step time outside the model's forward/backward, and
(on an accelerator) peak memory and model-FLOPs utilisation. Prints JSON.

    python benchmarks/train_step.py [--preset tiny] [--steps 20] [--workers 4]
    deepspeed --num_gpus 1 benchmarks/train_step.py --preset 7b [--offload_optimizer]

"tiny": the tiny model on the shapes-world assets, on CPU. "7b": a random-weight
LLaVA-7B-shaped backbone (LLaMA-7B, CLIP ViT-L/14 224 px) and SAM ViT-H, written to disk and
loaded through the real builder, bf16, ZeRO-2, gradient checkpointing (meant for a GPU; it
writes about 16 GB of random weights first). Both run the real data pipeline, DeepSpeed engine
and train_ds.py flags.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# DeepSpeed's logger binds the stdout of import time: import with stdout sent to stderr, so
# stdout carries the JSON alone
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.accelerator import get_accelerator  # noqa: E402

    from benchmarks.report import print_report  # noqa: E402
    from model.backbone import image_token_count  # noqa: E402
    from model.builder import build_segmenter  # noqa: E402
    from model.tiny import CLIP_L14_224, LLAMA_7B, write_tiny_llava, write_tiny_sam  # noqa: E402
    from tools.make_tiny_assets import make_tiny_assets  # noqa: E402
    from utils.collate import SampleProcessor  # noqa: E402
    from utils.config import parse_args  # noqa: E402
    from utils.engine import init_engine  # noqa: E402
    from utils.training import (  # noqa: E402
        init_distributed,
        training_dataset,
        training_loader,
    )

PRESET_FLAGS = {
    "tiny": ["--precision=fp32", "--out_dim=32", "--lora_r=4", "--no-gradient_checkpointing"],
    "7b": ["--precision=bf16", "--out_dim=256", "--lora_r=8", "--gradient_checkpointing"],
}
WARMUP_STEPS = 3
BYTES_PER_GB = 2**30
FLOPS_PER_PARAM_TOKEN = 6  # forward + backward of a dense layer, the standard 6N estimate


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESET_FLAGS), default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--grad_accumulation_steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="train_ds.py's default")
    parser.add_argument("--offload_optimizer", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="H100 SXM dense bf16")
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


def run_steps(engine, loader, config, steps: int, device, dtype) -> tuple[Clock, int, int]:
    """Time `steps` optimizer steps after WARMUP_STEPS; returns the clock and token counts."""
    clock, batches, tokens, images = Clock(), iter(loader), 0, 0
    engine.train()
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            clock, tokens, images = Clock(), 0, 0
        for _ in range(config.grad_accumulation_steps):
            with clock.section("data"):
                batch = next(batches).to(device, dtype)
            with clock.section("forward"):
                output = engine(batch)
            with clock.section("backward"):
                engine.backward(output.loss)
            with clock.section("step"):
                engine.step()
            tokens += int(batch.attention_mask.sum())
            images += batch.num_images
    return clock, tokens, images


def measure(args) -> dict:
    rank, world = init_distributed()
    with tempfile.TemporaryDirectory() as scratch:
        assets = write_assets(args.preset, Path(scratch))
        config = train_config(args, assets)
        model, tokenizer = build_segmenter(config.model_config())
        processor = SampleProcessor.for_model(
            model, tokenizer, config.version, config.conv_type, config.model_max_length
        )
        dataset = training_dataset(config, processor, world, check=False)
        engine = init_engine(model, config, world)
        loader = training_loader(dataset, config, rank, world, model.token_ids.pad)
        device = get_accelerator().current_device_name()
        clock, tokens, images = run_steps(
            engine, loader, config, args.steps, device, config.model_config().dtype
        )
    return summarise(args, config, model, clock, tokens, images)


def summarise(args, config, model, clock: Clock, tokens: int, images: int) -> dict:
    total = sum(clock.totals.values())
    per_step = {name: value / args.steps for name, value in clock.totals.items()}
    language_params = sum(p.numel() for p in model.llava.model.language_model.parameters())
    result = {
        "preset": args.preset,
        "device": get_accelerator().device_name(),
        "image_tokens": image_token_count(model.llava.config),
        "seconds_per_step": total / args.steps,
        "seconds_per_step_by_part": per_step,
        "samples_per_s": images / total,
        "data_wait_fraction": clock.totals["data"] / total,
        "outside_forward_backward_fraction": 1
        - (clock.totals["forward"] + clock.totals["backward"]) / total,
        "llm_tokens_per_s": tokens / total,
        "workers": config.workers,
    }
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        flops = FLOPS_PER_PARAM_TOKEN * language_params * tokens / total
        result["model_flops_utilisation"] = flops / (args.peak_tflops * 1e12)
        result["peak_memory_gb"] = accelerator.max_memory_allocated() / BYTES_PER_GB
    return result


def main() -> None:
    print_report(measure, parse())


if __name__ == "__main__":
    main()
