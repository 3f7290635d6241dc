"""Data-pipeline throughput: samples/s per source and for the default mix, against the cost of
decoding the image alone, and loader-worker memory over many samples. Prints JSON.

    python benchmarks/data_throughput.py [--image_size 640x480] [--sam_size 1024]
        [--samples 120] [--workers 1,2] [--memory_samples 10000] [--assets DIR]
        [--lisa_repo DIR] [--rounds 3] [--sources ade20k,refcoco]

Images come from the shapes-world writer at the given size (realistic JPEG sizes); CLIP uses the
real ViT-L/14 settings (224 px, 256 image tokens) and SAM the real 1024 px input, so the work per
sample is that of a real run. Every source is timed on one core (one thread for torch and
OpenCV). Target: >= 20 samples/s per CPU core for every source.

With `--lisa_repo` (a LISA checkout, or its bare git directory) it also times LISA's own,
unmodified dataset classes on the same assets, in a worker process
(`benchmarks/lisa_loaders.py`, whose docstring lists the stand-ins it needs on today's
libraries), paired with ours: for each of `--rounds` rounds and each source LISA has a loader
for, `--samples` samples of ours then `--samples` of LISA's, both after a warm-up. `lisa` in the
JSON gives per source both times (ms per sample) and `ratio` = our samples/s over LISA's: the
median of `round_ratios` (one per round), `ratio_of_means` from the summed times. Ours is
sample + `SampleProcessor` (tokenization included) with the sampling of `configs/lisa.yaml`
(LISA_RECIPE: the targets per sample LISA draws; the per-source figures above use the default
m2sa sampling, up to 9 targets per sample); LISA's is `__getitem__` (LISA tokenizes in its
collate function, which is not timed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lisa_loaders import LISA_SOURCES  # noqa: E402
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
LISA_WORKER = ROOT / "benchmarks" / "lisa_loaders.py"
WARMUP_SAMPLES = 3
# configs/lisa.yaml's sampling (LISA's loaders: up to 3 one-target questions per image, its short
# question lists): the work per sample LISA's loaders do, for the paired comparison
LISA_RECIPE = SamplingOptions(
    num_classes_per_sample=3,
    prompt_style="lisa",
    use_expand_question_list=False,
    explanatory=0.1,
    no_target_answer="empty_seg",
)
# the real CLIP ViT-L/14 preprocessor_config.json, for LISA's CLIPImageProcessor
BICUBIC = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", default="640x480", help="WxH of the written images")
    parser.add_argument("--sam_size", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=120, help="samples timed per source")
    parser.add_argument("--workers", default="1,2", help="loader worker counts for the mix")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--memory_samples", type=int, default=10000)
    parser.add_argument("--assets", type=Path, help="reuse a make_tiny_assets output")
    parser.add_argument("--lisa_repo", type=Path, help="also time LISA's loaders (docstring)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds with --lisa_repo")
    parser.add_argument(
        "--sources", default="", help="comma-separated dataset names to time (default: all)"
    )
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


def draw_and_process(
    source, processor: SampleProcessor, samples: int, rng: np.random.Generator
) -> list[str]:
    """`samples` processed samples of `source` (unusable draws redrawn, as the mixer does);
    returns their image paths."""
    paths: list[str] = []
    while len(paths) < samples:
        try:
            sample = source.sample(rng)
        except UnusableSample:  # a record with nothing to ask about: the mixer draws again
            continue
        processor(sample)
        paths.append(sample.image_path)
    return paths


def time_source(source, processor: SampleProcessor, samples: int) -> dict[str, float]:
    """Full pipeline (sample + process) vs decoding the same images alone, one process."""
    start = time.perf_counter()
    paths = draw_and_process(source, processor, samples, np.random.default_rng(0))
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


def mix_dataset(
    assets: Path,
    processor: SampleProcessor,
    length: int,
    options: SamplingOptions | None = None,
) -> HybridDataset:
    """The default mix over every source (`options`: their sampling; None = the defaults)."""
    config = DataConfig(
        dataset_dir=assets / "dataset",
        dataset=MIX,
        sample_rates=MIX_RATES,
        family_data={f: tuple(DEFAULT_FAMILY_DATA[f].split("||")) for f in MIX}
        | {"refer_seg": REFER_DATA},
        options=options or SamplingOptions(),
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


def one_core() -> None:
    """One thread for torch and OpenCV (their default is a pool over every core)."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def selected(source_name: str, names: str) -> bool:
    """Whether `--sources` (comma-separated dataset names, "" = all) names this source."""
    wanted = [name for name in names.split(",") if name]
    return not wanted or source_name.split("/", 1)[1] in wanted


def benchmark_sources(
    assets: Path, processor: SampleProcessor, names: str, options: SamplingOptions | None = None
) -> list:
    """The mix's sources that `--sources` names (all when it is empty), with `options`."""
    families = mix_dataset(assets, processor, 1, options).families
    return [source for _, family in families for source in family if selected(source.name, names)]


def measure(args: argparse.Namespace) -> dict:
    one_core()
    width, height = (int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        assets = args.assets or make_tiny_assets(
            Path(scratch), image_size=(width, height), images_per_split=16
        )
        processor = real_processor(assets, args.sam_size)
        results = {"image_size": [width, height], "sam_size": args.sam_size, "sources": {}}
        for source in benchmark_sources(assets, processor, args.sources):
            results["sources"][source.name] = time_source(source, processor, args.samples)
        if args.lisa_repo:
            sources = benchmark_sources(assets, processor, args.sources, LISA_RECIPE)
            results["lisa"] = compare_with_lisa(args, assets, Path(scratch), processor, sources)
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


class LisaWorker:
    """`benchmarks/lisa_loaders.py` in its own process (one thread), asked one source at a time."""

    def __init__(self, lisa_repo: Path, dataset_dir: Path, scratch: Path) -> None:
        clip_dir = scratch / "clip_vit_l14"
        clip_dir.mkdir(exist_ok=True)
        (clip_dir / "preprocessor_config.json").write_text(json.dumps(clip_settings()))
        command = [sys.executable, str(LISA_WORKER), "--lisa_repo", str(lisa_repo)]
        command += ["--dataset_dir", str(dataset_dir), "--clip_dir", str(clip_dir)]
        environment = os.environ | {"OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment
        )

    def time(self, source: str, samples: int) -> dict:
        """{"seconds", "samples", "failures", "error"} of `samples` LISA draws of `source`."""
        self.process.stdin.write(json.dumps({"source": source, "samples": samples}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{LISA_WORKER} stopped (its error is printed above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def clip_settings() -> dict:
    """preprocessor_config.json of openai/clip-vit-large-patch14 (the settings of ours)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": CLIP_SIZE},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": CLIP_SIZE, "width": CLIP_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def lisa_name(source_name: str) -> str | None:
    """LISA's name of one of our sources ("sem_seg/ade20k" -> "ade20k"), None if it has none."""
    name = source_name.split("/", 1)[1]
    return name if name in LISA_SOURCES else None


@dataclass
class PairedTimes:
    """One source's paired rounds: summed seconds of ours and of LISA's (per-sample time times
    `--samples`, so draws LISA failed do not count), LISA's failed draws, its last error."""

    ours: float = 0.0
    lisa: float = 0.0
    lisa_failures: int = 0
    lisa_error: str | None = None
    round_ratios: list[float] = field(default_factory=list)

    def summary(self, samples: int, rounds: int) -> dict:
        """ms per sample of both (`samples` per round; LISA's over the rounds where it had a
        successful draw), and our samples/s over LISA's."""
        ours = self.ours / (samples * rounds)
        entry: dict = {"ours_ms_per_sample": round(1000 * ours, 2)}
        if self.round_ratios:
            lisa = self.lisa / (samples * len(self.round_ratios))
            entry["lisa_ms_per_sample"] = round(1000 * lisa, 2)
            # the median round: a burst of other load on the machine moves one round, not it
            entry["ratio"] = round(float(np.median(self.round_ratios)), 3)
            entry["ratio_of_means"] = round(lisa / ours, 3)
            entry["round_ratios"] = self.round_ratios
        entry["lisa_failures"] = self.lisa_failures
        if self.lisa_error:
            entry["lisa_error"] = self.lisa_error
        return entry


def compare_with_lisa(args, assets: Path, scratch: Path, processor, sources) -> dict:
    """Paired rounds of ours and LISA's loaders per source (module docstring)."""
    worker = LisaWorker(args.lisa_repo, assets / "dataset", scratch)
    paired = [(source, lisa_name(source.name)) for source in sources]
    report = {"repo": str(args.lisa_repo), "rounds": args.rounds, "samples": args.samples}
    report["sources"] = {s.name: {"lisa_loader": None} for s, name in paired if name is None}
    times = {source.name: PairedTimes() for source, name in paired if name}
    try:
        for source, name in paired:
            if name:  # warm-up: first reads of files and of LISA's dataset construction
                draw_and_process(source, processor, WARMUP_SAMPLES, np.random.default_rng(0))
                worker.time(name, WARMUP_SAMPLES)
        for round_ in range(args.rounds):
            for source, name in paired:
                if name:
                    seed = round_ + 1
                    pair_round(worker, source, name, processor, args.samples, seed, times)
    finally:
        worker.close()
    for source_name, paired_times in times.items():
        report["sources"][source_name] = paired_times.summary(args.samples, args.rounds)
    ratios = [entry["ratio"] for entry in report["sources"].values() if "ratio" in entry]
    if ratios:
        report["geometric_mean_ratio"] = round(math.exp(np.mean(np.log(ratios))), 3)
        report["min_ratio"] = min(ratios)
    return report


def pair_round(worker, source, name, processor, samples: int, seed: int, times) -> None:
    """One round of one source: ours, then LISA's; added to `times[source.name]`."""
    start = time.perf_counter()
    draw_and_process(source, processor, samples, np.random.default_rng(seed))
    ours = (time.perf_counter() - start) / samples
    lisa = worker.time(name, samples)
    paired = times[source.name]
    paired.ours += ours * samples
    paired.lisa_failures += lisa["failures"]
    paired.lisa_error = lisa["error"] or paired.lisa_error
    if lisa["samples"]:
        lisa_per_sample = lisa["seconds"] / lisa["samples"]
        paired.lisa += lisa_per_sample * samples
        paired.round_ratios.append(round(lisa_per_sample / ours, 3))


if __name__ == "__main__":
    main()
