"""Times LISA's own, unmodified dataset classes (its `utils/*_dataset.py`) on our assets.

    python benchmarks/lisa_loaders.py --lisa_repo DIR --dataset_dir DIR --clip_dir DIR

A worker process for `benchmarks/data_throughput.py --lisa_repo`: it reads one JSON request
per line on stdin, `{"source": "ade20k", "samples": 40}`, draws that many items with the
source's LISA dataset (`dataset[0]`, which draws a random record as LISA's training does) and
answers one JSON line `{"seconds": ..., "samples": ..., "failures": ..., "error": ...}` on
stdout. It never imports this project (LISA's `model` and `utils` packages would clash with
ours), so it runs in its own process with the LISA checkout as working directory (LISA opens
`utils/ade20k_classes.json` relative to it). `--lisa_repo` is a LISA checkout or a bare git
directory (its HEAD is then exported with `git archive` to a temporary folder).

What is timed: `__getitem__` (image decode, CLIP preprocessing, SAM resize/normalise/pad, label
or annotation decoding, masks, conversation texts). LISA tokenizes in its collate function,
which is not timed, so LISA's side does less work than ours (ours includes tokenization).
Draws that raise (e.g. refer instances stored as a bare RLE dict: LISA reads
`segmentation[0]`) are counted as `failures` and not timed.

Stand-ins inserted before LISA's modules are imported (nothing of LISA's code is changed):
- `torchvision.transforms.functional.resize` / `to_pil_image`, when torchvision is not
  installed (it is not in this project's requirements): the same math through PIL, as
  torchvision does for a PIL image: `Image.fromarray(array)`, then
  `image.resize((w, h), BILINEAR)` (`resize` takes (h, w)).
- `model`, `model.llava`, `model.segment_anything` as bare packages over LISA's folders: their
  `__init__.py` build the LLaVA and SAM model classes, which do not import on transformers 5;
  the data loaders only use `model.llava.conversation` and
  `model.segment_anything.utils.transforms`, which are imported unmodified.
- `matplotlib` (`pyplot`, `collections`, `patches`) and `skimage.io` as modules whose names
  are placeholders that fail when called: LISA's REFER / G_REFER import them only for their
  drawing methods.
- `transformers.CLIPImageProcessor` is used as transformers 5 provides it; without torchvision
  it is the PIL backend (`CLIPImageProcessorPil`), as the 4.31 processor was PIL + NumPy. Its
  settings come from `--clip_dir/preprocessor_config.json` (written by data_throughput.py with
  the real ViT-L/14 values).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

SAM_SIZE = 1024  # LISA's --image_size default
CLASSES_PER_SAMPLE = 3  # LISA's --num_classes_per_sample default
EXPLANATORY = 0.1  # LISA's --explanatory default
SEM_SEG = ("ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part")
REFER = ("refclef", "refcoco", "refcoco+", "refcocog", "grefcoco")
VQA, REASON_SEG = "llava_instruct_150k", "ReasonSeg|train"
LISA_SOURCES = (*SEM_SEG, *REFER, VQA, REASON_SEG)
STUB_MODULES = (
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.collections",
    "matplotlib.patches",
    "skimage",
    "skimage.io",
)
# LISA's packages whose __init__.py build its models: bare packages over these folders instead
PACKAGES = {
    "model": "model",
    "model.llava": "model/llava",
    "model.segment_anything": "model/segment_anything",
}
SEED = 0


def checkout(lisa_repo: Path, scratch: Path) -> Path:
    """A directory holding LISA's files: `lisa_repo` itself, or its HEAD exported there."""
    if (lisa_repo / "utils" / "sem_seg_dataset.py").is_file():
        return lisa_repo
    exported = subprocess.run(
        ["git", "--git-dir", str(lisa_repo), "archive", "HEAD"], capture_output=True
    )
    if exported.returncode != 0:
        raise SystemExit(
            f"--lisa_repo {lisa_repo}: neither a LISA checkout (no utils/sem_seg_dataset.py) "
            f"nor a git directory ({exported.stderr.decode().strip()})"
        )
    target = scratch / "lisa"
    target.mkdir()
    subprocess.run(["tar", "-x", "-C", str(target)], input=exported.stdout, check=True)
    return target


def install_stand_ins(repo: Path) -> None:
    """The stand-ins of the module docstring, in `sys.modules`. transformers is imported first:
    it looks torchvision up once, and must find it absent."""
    from transformers import CLIPImageProcessor  # noqa: F401

    if importlib.util.find_spec("torchvision") is None:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.to_pil_image = Image.fromarray
        functional.resize = lambda image, size: image.resize(
            (size[1], size[0]), Image.Resampling.BILINEAR
        )
        for name in ("torchvision", "torchvision.transforms"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision.transforms.functional"] = functional
    for name in STUB_MODULES:
        sys.modules[name] = drawing_stand_in(name)
    for name, folder in PACKAGES.items():
        package = types.ModuleType(name)
        package.__path__ = [str(repo / folder)]
        sys.modules[name] = package


def drawing_stand_in(name: str) -> types.ModuleType:
    """A module whose every attribute (`Polygon`, `PatchCollection`...) is a placeholder that
    fails only when called: LISA's loaders import them but never draw."""
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{name} is a benchmark stand-in; LISA's drawing code cannot run")

    module.__getattr__ = lambda attribute: unavailable
    return module


def build(source: str, dataset_dir: str, clip_dir: str):
    """LISA's dataset class for one source, with LISA's training defaults."""
    common = dict(
        base_image_dir=dataset_dir,
        tokenizer=None,  # used by LISA's collate function only
        vision_tower=clip_dir,
        image_size=SAM_SIZE,
        num_classes_per_sample=CLASSES_PER_SAMPLE,
    )
    if source in SEM_SEG:
        module = importlib.import_module("utils.sem_seg_dataset")
        return module.SemSegDataset(**common, sem_seg_data=source)
    if source in REFER:
        module = importlib.import_module("utils.refer_seg_dataset")
        return module.ReferSegDataset(**common, refer_seg_data=source)
    if source == VQA:
        return importlib.import_module("utils.vqa_dataset").VQADataset(**common, vqa_data=source)
    if source == REASON_SEG:
        module = importlib.import_module("utils.reason_seg_dataset")
        return module.ReasonSegDataset(**common, reason_seg_data=source, explanatory=EXPLANATORY)
    raise ValueError(f"LISA has no loader for {source!r}; known: {', '.join(LISA_SOURCES)}")


def time_items(dataset, samples: int) -> dict:
    """Seconds for `samples` successful `dataset[0]` draws; raising draws counted apart."""
    seconds, done, failures, error = 0.0, 0, 0, None
    while done < samples and failures < samples:
        start = time.perf_counter()
        try:
            dataset[0]
        except Exception as caught:  # LISA's own failure on a record: counted, not timed
            failures += 1
            error = f"{type(caught).__name__}: {caught}"
            continue
        seconds += time.perf_counter() - start
        done += 1
    return {"seconds": seconds, "samples": done, "failures": failures, "error": error}


def serve(dataset_dir: str, clip_dir: str) -> None:
    """Answer timing requests on stdin until it closes (module docstring)."""
    answer = sys.stdout
    datasets = {}
    for line in sys.stdin:
        request = json.loads(line)
        source = request["source"]
        with contextlib.redirect_stdout(sys.stderr):  # LISA prints its dataset sizes
            if source not in datasets:
                datasets[source] = build(source, dataset_dir, clip_dir)
            reply = time_items(datasets[source], request["samples"])
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lisa_repo", type=Path, required=True)
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--clip_dir", type=Path, required=True, help="preprocessor_config.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as ours is timed
    cv2.setNumThreads(1)
    random.seed(SEED)
    np.random.seed(SEED)
    with tempfile.TemporaryDirectory() as scratch:
        repo = checkout(args.lisa_repo.resolve(), Path(scratch))
        install_stand_ins(repo)
        sys.path.insert(0, str(repo))
        with contextlib.chdir(repo):
            serve(str(args.dataset_dir.resolve()), str(args.clip_dir.resolve()))


if __name__ == "__main__":
    main()
