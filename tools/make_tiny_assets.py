"""Write a tiny synthetic dataset in every family's real layout, plus the tiny models.

    python tools/make_tiny_assets.py --out DIR [--seed 0] [--image_size 96x72]
        [--images_per_split 8] [--min_objects 2] [--max_objects 5] [--size_jitter 0]
        [--absent_refs 1] [--families ade20k,refer_seg,...] [--no-models] [--model_preset tiny]
        [--pretrain_steps 0] [--clip_steps 0] [--llava_steps 0] [--backbone llava]
        [--segmenter sam]

writes `DIR/dataset/` (a `--dataset_dir`), `DIR/llava_tiny/` (a `--version`; with
`--backbone qwen2_5_vl` a tiny random Qwen2.5-VL in its Hugging Face format,
`DIR/qwen2_5_vl_tiny/`, instead) and
`DIR/vision_pretrained/sam_tiny.pth` (a `--vision_pretrained`; with `--segmenter sam2` a tiny
random SAM 2 in the released `sam2.1_hiera_*.pt` layout, `DIR/vision_pretrained/sam2_tiny.pt`,
instead); with `--pretrain_steps N` the
two models' image encoders get N steps of pretraining on other shapes-world scenes (CLIP then
`--clip_steps` more alone), and with `--llava_steps M` the LLaVA's projector and language
model then M steps of answering whether named shapes are in them and captioning them
(`tools/tiny_assets/pretrain.py`), as real models come pretrained. Images show coloured
shapes (`tools/tiny_assets/shapes_world.py`); every annotation is derived from the same scene
objects, so texts and masks agree, and each kind is labelled as one real class of each
vocabulary (COCO things, ADE20K-150, COCO-Stuff: `tools/tiny_assets/classes.py`), read through
the class lists shipped with the loaders, as real downloads hold none. The tiny LLaVA's
tokenizer is written both as `tokenizer.model` (sentencepiece) and `tokenizer.json`, one
tokenizer in two files.
The same seed and flags give the same bytes (JSON, pickles, PNG and JPEG).
Files already under DIR are overwritten, never deleted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from tools.tiny_assets.common import AssetOptions, Context, write_jpeg  # noqa: E402
from tools.tiny_assets.grefcoco import write_grefcoco, write_refcocom  # noqa: E402
from tools.tiny_assets.lasagna_train import write_lasagna_train  # noqa: E402
from tools.tiny_assets.mmr import write_mmr  # noqa: E402
from tools.tiny_assets.parts import coco_file_name, write_paco, write_pascal_part  # noqa: E402
from tools.tiny_assets.reason_seg import write_reason_seg  # noqa: E402
from tools.tiny_assets.refer import train2014_pool, write_refer_family  # noqa: E402
from tools.tiny_assets.refzom import write_refzom  # noqa: E402
from tools.tiny_assets.semantic import write_ade20k, write_cocostuff, write_mapillary  # noqa: E402
from tools.tiny_assets.semantic_val import write_semantic_val  # noqa: E402
from tools.tiny_assets.vqa import write_vqa  # noqa: E402

if TYPE_CHECKING:  # torch only when the models are written
    from tools.tiny_assets.pretrain import PretrainOptions

FAMILIES = (
    "ade20k",
    "cocostuff",
    "mapillary",
    "paco_lvis",
    "pascal_part",
    "refer_seg",
    "grefcoco",
    "refzom",
    "refcocom",
    "mmr",
    "reason_seg",
    "vqa",
    "semantic_val",
    "lasagna_train",
)
COCO2017_FAMILIES = {"cocostuff", "vqa"}
TRAIN2014_FAMILIES = {"refer_seg", "grefcoco", "refzom", "refcocom"}
COCO2017_FIRST_ID = 200001
DEFAULT_IMAGE_SIZE = (96, 72)
# the tiny backbones (`model.tiny.TINY_BACKBONES`, named here so that --help needs no torch)
BACKBONES = ("llava", "qwen2_5_vl", "qwen3_vl")
DEFAULT_BACKBONE = "llava"
# the tiny mask models (`model.tiny.TINY_SEGMENTERS`)
SEGMENTERS = ("sam", "sam2")
DEFAULT_SEGMENTER = "sam"


def write_coco2017(ctx: Context, families: set[str]) -> None:
    """COCO 2017 images shared by COCO-Stuff and the VQA records, then those families."""
    scenes = ctx.scenes("coco train2017", ctx.options.images_per_split)
    image_ids = [COCO2017_FIRST_ID + offset for offset in range(len(scenes))]
    for scene, image_id in zip(scenes, image_ids, strict=True):
        write_jpeg(ctx.root / "coco" / "train2017" / coco_file_name(image_id), scene.image)
    if "cocostuff" in families:
        write_cocostuff(ctx, scenes, image_ids)
    if "vqa" in families:
        write_vqa(ctx, scenes, image_ids)


def write_train2014(ctx: Context, families: set[str]) -> None:
    """The COCO train2014 pool, then the referring families that share it."""
    pool = train2014_pool(ctx)
    if "refer_seg" in families:
        write_refer_family(ctx, pool)
    if "grefcoco" in families:
        write_grefcoco(ctx, pool)
    if "refzom" in families:
        write_refzom(ctx, pool)
    if "refcocom" in families:
        write_refcocom(ctx, pool)


SINGLE_WRITERS = {
    "ade20k": write_ade20k,
    "mapillary": write_mapillary,
    "paco_lvis": write_paco,
    "pascal_part": write_pascal_part,
    "mmr": write_mmr,
    "reason_seg": write_reason_seg,
    "semantic_val": write_semantic_val,
    "lasagna_train": write_lasagna_train,
}


def write_models(
    out: Path,
    seed: int,
    model_preset: str,
    pretrain: PretrainOptions | None = None,
    backbone: str = DEFAULT_BACKBONE,
    segmenter: str = DEFAULT_SEGMENTER,
) -> None:
    """The tiny backbone (`out/<backbone>_tiny/`, LLaVA's `out/llava_tiny/` by default) and mask
    model (`out/vision_pretrained/sam_tiny.pth`, or `sam2_tiny.pt`) of the preset, pretrained
    with `pretrain` (a `PretrainOptions`, LLaVA and SAM only) unless it is None."""
    # heavy imports (torch, transformers) only when the models are wanted
    from model.tiny import (
        MODEL_PRESETS,
        TINY_BACKBONES,
        TINY_SEGMENTERS,
        write_tiny_llava,
        write_tiny_sam,
    )

    if (backbone, segmenter) != (DEFAULT_BACKBONE, DEFAULT_SEGMENTER) and (
        pretrain is not None or model_preset != "tiny"
    ):
        raise ValueError(
            f"--backbone {backbone} --segmenter {segmenter} writes the tiny random models only "
            "(no --model_preset demo, no pretraining)"
        )
    preset = MODEL_PRESETS[model_preset]
    if segmenter == DEFAULT_SEGMENTER:
        sam = write_tiny_sam(out / "vision_pretrained" / "sam_tiny.pth", seed, dims=preset.sam)
    else:
        name, writer = TINY_SEGMENTERS[segmenter]
        writer(out / "vision_pretrained" / name, seed)
    if backbone != DEFAULT_BACKBONE:
        TINY_BACKBONES[backbone](out / f"{backbone}_tiny", seed)
        return
    llava = write_tiny_llava(out / "llava_tiny", seed, preset.text, preset.vision)
    if pretrain is not None:
        from tools.tiny_assets.pretrain import pretrain_tiny_models

        pretrain_tiny_models(llava, sam, pretrain)


def make_tiny_assets(
    out: str | Path,
    seed: int = 0,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    images_per_split: int = 8,
    min_objects: int = 2,
    max_objects: int = 5,
    size_jitter: float = 0.0,
    families: Sequence[str] = FAMILIES,
    models: bool = True,
    absent_refs: int = 1,
    model_preset: str = "tiny",
    pretrain_steps: int = 0,
    llava_steps: int = 0,
    clip_steps: int = 0,
    backbone: str = DEFAULT_BACKBONE,
    segmenter: str = DEFAULT_SEGMENTER,
) -> Path:
    """Write `out/dataset/` (the chosen families), and unless `models` is False the tiny
    backbone (`out/<backbone>_tiny/`: LLaVA's `out/llava_tiny/` by default, or Qwen2.5-VL's
    `out/qwen2_5_vl_tiny/`) and mask model (`out/vision_pretrained/sam_tiny.pth`, or SAM 2's
    `sam2_tiny.pt`). Returns `out`.

    image_size: (W, H). images_per_split: images per split of each family (per source for
    single-split families). size_jitter: each image shrinks by up to this fraction per side.
    absent_refs: gRefCOCO no-target refs per image (each naming another absent shape).
    model_preset: "tiny" (the tests' models) or "demo" (`model.tiny.MODEL_PRESETS`).
    pretrain_steps: steps of image-encoder pretraining (0: random encoders).
    llava_steps: steps of LLaVA pretraining (questions, captions) after it (needs
        pretrain_steps).
    clip_steps: steps of CLIP alone between the two (needs pretrain_steps).
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects})")
    if min(pretrain_steps, clip_steps, llava_steps) < 0:
        raise ValueError(
            f"pretrain_steps ({pretrain_steps}), clip_steps ({clip_steps}) and llava_steps "
            f"({llava_steps}) must be 0 (no pretraining) or more"
        )
    if (llava_steps or clip_steps) and not pretrain_steps:
        raise ValueError(
            "llava_steps and clip_steps need pretrain_steps: they continue from the pretrained "
            "encoders"
        )
    out = Path(out)
    width, height = image_size
    options = AssetOptions(
        width, height, images_per_split, min_objects, max_objects, size_jitter, absent_refs
    )
    ctx = Context(out / "dataset", options, seed)
    chosen = set(families)
    for name, writer in SINGLE_WRITERS.items():
        if name in chosen:
            writer(ctx)
    if chosen & COCO2017_FAMILIES:
        write_coco2017(ctx, chosen)
    if chosen & TRAIN2014_FAMILIES:
        write_train2014(ctx, chosen)
    if models:
        pretrain = None
        if pretrain_steps > 0:
            from tools.tiny_assets.pretrain import PretrainOptions

            pretrain = PretrainOptions(
                pretrain_steps,
                width=width,
                height=height,
                min_objects=min_objects,
                max_objects=max_objects,
                seed=seed,
                clip_steps=clip_steps,
                llava_steps=llava_steps,
            )
        write_models(out, seed, model_preset, pretrain, backbone, segmenter)
    return out


def parse_image_size(text: str) -> tuple[int, int]:
    """'96' -> (96, 96); '640x480' -> (640, 480) as (W, H)."""
    try:
        sides = [int(side) for side in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) <= 0:
        raise argparse.ArgumentTypeError(f"--image_size takes N or WxH, not {text!r}")
    return sides[0], sides[1]


def parse_families(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image_size", type=parse_image_size, default=DEFAULT_IMAGE_SIZE, help="N or WxH"
    )
    parser.add_argument("--images_per_split", type=int, default=8)
    parser.add_argument("--min_objects", type=int, default=2)
    parser.add_argument("--max_objects", type=int, default=5)
    parser.add_argument(
        "--size_jitter", type=float, default=0.0, help="shrink each side by up to this fraction"
    )
    parser.add_argument(
        "--absent_refs", type=int, default=1, help="gRefCOCO no-target refs per image"
    )
    parser.add_argument(
        "--model_preset",
        choices=("tiny", "demo"),
        default="tiny",
        help="model sizes: the tests' tiny models or the demo's (model/tiny.py)",
    )
    parser.add_argument(
        "--pretrain_steps",
        type=int,
        default=0,
        help="steps of image-encoder pretraining on other scenes (0: random encoders)",
    )
    parser.add_argument(
        "--clip_steps",
        type=int,
        default=0,
        help="then steps of CLIP alone (its token targets; needs --pretrain_steps)",
    )
    parser.add_argument(
        "--llava_steps",
        type=int,
        default=0,
        help="then steps of LLaVA's projector and language model on yes/no questions and captions",
    )
    parser.add_argument(
        "--families", type=parse_families, default=list(FAMILIES), help=",".join(FAMILIES)
    )
    parser.add_argument(
        "--models",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the tiny backbone and mask model (llava_tiny/, vision_pretrained/)",
    )
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=DEFAULT_BACKBONE,
        help="the tiny backbone written as <out>/<backbone>_tiny/ (default llava: llava_tiny/)",
    )
    parser.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        default=DEFAULT_SEGMENTER,
        help="the tiny mask model written under <out>/vision_pretrained/ (sam: sam_tiny.pth, "
        "sam2: sam2_tiny.pt)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = make_tiny_assets(
        args.out,
        args.seed,
        args.image_size,
        args.images_per_split,
        args.min_objects,
        args.max_objects,
        args.size_jitter,
        args.families,
        args.models,
        args.absent_refs,
        args.model_preset,
        args.pretrain_steps,
        args.llava_steps,
        args.clip_steps,
        args.backbone,
        args.segmenter,
    )
    files = sum(1 for path in out.rglob("*") if path.is_file())
    print(f"wrote {files} files under {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
