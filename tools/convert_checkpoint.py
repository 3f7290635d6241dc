"""Convert a published checkpoint once into this framework's formats:
`python tools/convert_checkpoint.py --input DIR --vision-tower CLIP_DIR --output DIR`.

- A LLaVA-v1 base (`LLaVA-Lightning-7B-v1-1`, `llava-llama-2-13b-chat-lightning-preview`)
  becomes a Hugging Face LLaVA directory: `LlavaForConditionalGeneration` with CLIP inside, the
  one-Linear projector kept exact (`model.layouts`), the tokenizer with `<image>` added and the
  LISA-family tokenization, and CLIP's `preprocessor_config.json`.
- A merged LISA-family directory (`LISA-7B-v1`, `LISA-13B-llama2-v1`, M2SA) becomes our merged
  checkpoint (`model.checkpoint`), with its trained SAM, projector and fusion.

`--version` reads both kinds of input directly too; a converted copy needs no `--vision-tower`,
loads with plain transformers, and is not re-mapped at every start. `--precision auto` writes
everything, CLIP included, in the stored dtype (config.json `torch_dtype`), as the LISA family
ran CLIP in its training dtype; `--precision fp32` copies without any rounding.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.backbone import resize_embeddings_to_mean  # noqa: E402
from model.builder import PRECISIONS, ModelConfig, build_segmenter  # noqa: E402
from model.checkpoint import DEFAULT_MAX_SHARD_SIZE, save_merged  # noqa: E402
from model.layouts import (  # noqa: E402
    LEGACY_LAYOUTS,
    Layout,
    build_legacy_llava,
    detect_layout,
    load_legacy_tokenizer,
    read_config,
    read_legacy_checkpoint,
)
from model.tokens import IMAGE_TOKEN  # noqa: E402

LOGGER = logging.getLogger("convert_checkpoint")
PREPROCESSOR_CONFIG = "preprocessor_config.json"
AUTO = "auto"
# config.json `torch_dtype` -> --precision
STORED_PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEFAULT_OUT_DIM = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="LLaVA-v1 or LISA directory")
    parser.add_argument(
        "--vision-tower",
        "--vision_tower",
        dest="vision_tower",
        required=True,
        help="local CLIP directory the checkpoint was trained with (clip-vit-large-patch14)",
    )
    parser.add_argument("--output", required=True, type=Path, help="new directory")
    parser.add_argument("--precision", default=AUTO, choices=[AUTO, *sorted(PRECISIONS)])
    parser.add_argument(
        "--conv_type", default="llava_v1", help="template recorded for LISA-family checkpoints"
    )
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE)
    return parser.parse_args(argv)


def stored_precision(directory: Path) -> str:
    """The --precision name of config.json's `torch_dtype`."""
    stored = read_config(directory).get("torch_dtype")
    if stored not in STORED_PRECISIONS:
        raise ValueError(
            f"{directory}: config.json torch_dtype is {stored!r}; pass --precision explicitly"
        )
    return STORED_PRECISIONS[stored]


def convert_llava_v1(options: argparse.Namespace, precision: str, layout: Layout) -> int:
    """LLaVA-v1 base (`layout` as detected) -> Hugging Face LLaVA directory. Returns CLIP's
    input size."""
    checkpoint = read_legacy_checkpoint(options.input, layout)
    if checkpoint.layout is Layout.LISA:  # segmentation tensors, config without the marker
        return convert_lisa(options, precision, checkpoint.layout)
    tokenizer = load_legacy_tokenizer(checkpoint)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llava = build_legacy_llava(checkpoint, options.vision_tower, image_id, PRECISIONS[precision])
    resize_embeddings_to_mean(llava, len(tokenizer))
    llava.save_pretrained(options.output, max_shard_size=options.max_shard_size)
    tokenizer.save_pretrained(options.output)
    return llava.config.vision_config.image_size


def convert_lisa(options: argparse.Namespace, precision: str, layout: Layout) -> int:
    """Merged LISA-family directory (`layout` as detected) -> our merged checkpoint. Returns
    CLIP's input size."""
    source, vision_tower = options.input, options.vision_tower
    config = ModelConfig(
        version=str(source),
        vision_pretrained="",
        vision_tower=vision_tower,
        precision=precision,
        gradient_checkpointing=False,
        lora_r=0,
        out_dim=read_config(source).get("out_dim", DEFAULT_OUT_DIM),
    )
    model, tokenizer = build_segmenter(config, layout)
    save_merged(
        model,
        tokenizer,
        options.output,
        source_version=source,
        conv_type=options.conv_type,
        provenance={
            "converted_from": str(source.resolve()),
            "layout": Layout.LISA.value,
            "vision_tower": str(Path(vision_tower).resolve()),
        },
        max_shard_size=options.max_shard_size,
    )
    return model.llava.config.vision_config.image_size


def write_image_settings(vision_tower: str, output: Path, image_size: int) -> None:
    """CLIP's preprocessor_config.json, or OpenAI CLIP's settings at its input size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    settings = Path(vision_tower) / PREPROCESSOR_CONFIG
    if settings.is_file():
        shutil.copyfile(settings, output / PREPROCESSOR_CONFIG)
        return
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(output)


def convert(options: argparse.Namespace) -> Path:
    """Convert `options.input` into `options.output` (which must not hold files yet)."""
    source, output = options.input, options.output
    layout = detect_layout(source)
    if layout not in LEGACY_LAYOUTS:
        raise ValueError(f"{source} is already a {layout.value} directory; use it as --version")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {output} is not empty")
    output.mkdir(parents=True, exist_ok=True)
    precision = stored_precision(source) if options.precision == AUTO else options.precision
    converter = convert_lisa if layout is Layout.LISA else convert_llava_v1
    image_size = converter(options, precision, layout)
    write_image_settings(options.vision_tower, output, image_size)
    LOGGER.info("wrote %s (%s, from the %s layout)", output, precision, layout.value)
    return output


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    convert(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
