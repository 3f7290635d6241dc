"""Data-pipeline throughput: samples/s per source and for the default mix, against the cost of
decoding the image alone, and loader-worker memory over many samples. Prints JSON.

    python benchmarks/data_throughput.py [--image_size 640x480] [--sam_size 1024]
        [--samples 120] [--workers 1,2] [--memory_samples 10000] [--assets DIR]

Images come from the shapes-world writer at the given size (realistic JPEG sizes); CLIP uses the
real ViT-L/14 settings (224 px, 256 image tokens) and SAM the real 1024 px input, so the work per
sample is that of a real run. Target: >= 20 samples/s per CPU core for every source.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_report  # noqa: E402
from model.backbone import load_tokenizer  # noqa: E402
from model.tiny import CLIP_MEAN, CLIP_STD  # noqa: E402
from model.tokens import add_segmentation_tokens  # noqa: E402
from tools.make_tiny_assets import make_tiny_assets  # noqa: E402
from utils.collate import Collator, SampleProcessor  # noqa: E402
from utils.datasets.base import SamplingOptions, UnusableSample, read_image  # noqa: E402
from utils.datasets.mixer import (  # noqa: E402
    DEFAULT_FAMILY_DATA,
    DataConfig,
    HybridDataset,
    build_sources,
)
from utils.preprocess import ClipTransform, ImageProcessors, SamTransform  # noqa: E402

CLIP_SIZE = 224  # openai/clip-vit-large-patch14
CLIP_PATCH = 14
MIX = ("sem_seg", "refer_seg", "vqa", "multi_part_reason_seg", "reason_seg")
MIX_RATES = (2, 9, 2, 6, 1)
BYTES_PER_MB = 2**20
REFER_DATA = ("refclef", "refcoco", "refcoco+", "refcocog", "grefcoco")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", default="640x480", help="WxH of the written images")
    parser.add_argument("--sam_size", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=120, help="samples timed per source")
    parser.add_argument("--workers", default="1,2", help="loader worker counts for the mix")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--memory_samples", type=int, default=10000)
    parser.add_argument("--assets", type=Path, help="reuse a make_tiny_assets output")
    return parser.parse_args()


def real_processor(assets: Path, sam_size: int) -> SampleProcessor:
    """Tokenizer of the tiny LLaVA, with the real CLIP and SAM image settings."""
    tokenizer = load_tokenizer(assets / "llava_tiny")
    token_ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True)
    clip = ClipTransform(
        resize={"shortest_edge": CLIP_SIZE},
        resample=Image.Resampling.BICUBIC,
        crop=(CLIP_SIZE, CLIP_SIZE),
        rescale=1 / 255,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )
    return SampleProcessor(
        tokenizer=tokenizer,
        token_ids=token_ids,
        images=ImageProcessors(clip, SamTransform(sam_size)),
        image_tokens=(CLIP_SIZE // CLIP_PATCH) ** 2,
    )


def time_source(source, processor: SampleProcessor, samples: int) -> dict[str, float]:
    """Full pipeline (sample + process) vs decoding the same images alone, one process."""
    rng = np.random.default_rng(0)
    paths = []
    start = time.perf_counter()
    while len(paths) < samples:
        try:
            sample = source.sample(rng)
        except UnusableSample:  # a record with nothing to ask about: the mixer draws again
            continue
        processor(sample)
        paths.append(sample.image_path)
    pipeline = time.perf_counter() - start
    start = time.perf_counter()
    for path in paths:
        read_image(path)
    decode = time.perf_counter() - start
    return {
        "samples_per_s": round(samples / pipeline, 1),
        "decode_only_per_s": round(samples / decode, 1),
        "ms_per_sample": round(1000 * pipeline / samples, 2),
        "decode_ms_per_sample": round(1000 * decode / samples, 2),
    }


def mix_dataset(assets: Path, processor: SampleProcessor, length: int) -> HybridDataset:
    config = DataConfig(
        dataset_dir=assets / "dataset",
        dataset=MIX,
        sample_rates=MIX_RATES,
        family_data={f: tuple(DEFAULT_FAMILY_DATA[f].split("||")) for f in MIX}
        | {"refer_seg": REFER_DATA},
        options=SamplingOptions(),
    )
    return HybridDataset(build_sources(config), MIX_RATES, length=length, process=processor)


def loader(dataset, processor, workers: int, batch_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=Collator(processor.token_ids.pad),
        persistent_workers=workers > 0,
    )


def time_mix(assets, processor, workers: int, batch_size: int, samples: int) -> float:
    batches = loader(mix_dataset(assets, processor, samples), processor, workers, batch_size)
    iterator = iter(batches)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    count = sum(1 for _ in iterator)
    return round(count * batch_size / (time.perf_counter() - start), 1)


def worker_memory(assets, processor, samples: int, batch_size: int) -> dict[str, float]:
    """RSS of the loader workers after 10% and after 100% of `samples` samples (2 workers)."""
    batches = loader(mix_dataset(assets, processor, samples), processor, 2, batch_size)
    readings = {}
    checkpoints = {max(1, samples // 10 // batch_size): "rss_mb_after_10pct"}
    steps = 0
    for steps, _ in enumerate(batches, start=1):
        if steps in checkpoints:
            readings[checkpoints[steps]] = rss_of_children()
    readings["rss_mb_at_end"] = rss_of_children()
    readings["samples"] = steps * batch_size
    return readings


def rss_of_children() -> float:
    children = psutil.Process().children(recursive=True)
    return round(sum(child.memory_info().rss for child in children) / BYTES_PER_MB, 1)


def main() -> None:
    print_report(measure, parse_args())


def measure(args: argparse.Namespace) -> dict:
    width, height = (int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        assets = args.assets or make_tiny_assets(
            Path(scratch), image_size=(width, height), images_per_split=16
        )
        processor = real_processor(assets, args.sam_size)
        results = {"image_size": [width, height], "sam_size": args.sam_size, "sources": {}}
        families = mix_dataset(assets, processor, 1).families
        for _, sources in families:
            for source in sources:
                results["sources"][source.name] = time_source(source, processor, args.samples)
        results["mix_samples_per_s"] = {
            workers: time_mix(assets, processor, int(workers), args.batch_size, args.samples * 2)
            for workers in args.workers.split(",")
        }
        if args.memory_samples:
            results["worker_memory"] = worker_memory(
                assets, processor, args.memory_samples, args.batch_size
            )
        results["cpu_cores"] = psutil.cpu_count()
    return results


if __name__ == "__main__":
    main()
