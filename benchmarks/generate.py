"""Generation benchmark: tokens/s and seconds per answer for 32 / 128 / 512 new tokens, greedy
with the KV cache against re-running the full sequence (vision tower included) at every step,
as LISA's chat did. Checks that both give identical tokens and masks. Prints JSON.

    python benchmarks/generate.py [--preset tiny] [--batch_sizes 1,8] [--new_tokens 32,128,512]
    python benchmarks/generate.py --preset 7b          # a GPU machine

"tiny": the tiny model (LLaMA width 64, 2 layers; CLIP 32 px) through the real builder, fp32,
on CPU. "7b": random weights of LLaVA-7B's shapes (LLaMA-7B, CLIP ViT-L/14 224 px, the tiny
1k-token vocabulary) and SAM ViT-H, built in memory in bf16 on the accelerator. End-of-sequence
is disabled so every answer has exactly the requested length. The prompt is one image and a
referring question, as in chat.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_report  # noqa: E402
from model.backbone import image_token_count, resize_embeddings_to_mean  # noqa: E402
from model.generate import generate  # noqa: E402
from model.sam import build_sam, sam_config_from_preset  # noqa: E402
from model.segmenter import Segmenter, build_projector  # noqa: E402
from model.tiny import (  # noqa: E402
    CLIP_L14_224,
    LLAMA_7B,
    build_tiny_segmenter,
    build_tiny_tokenizer,
    llava_config,
)
from model.tokens import add_segmentation_tokens  # noqa: E402
from utils.collate import ProcessedSample, collate, template_for, tokenize_prompt  # noqa: E402
from utils.datasets.base import IMAGE_PLACEHOLDER  # noqa: E402

QUESTION = "Please segment the red circle on the left in this image."
NO_EOS = -1
IMAGE_SIZE = (480, 640)
REPEATS = {"tiny": 2, "7b": 1}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--new_tokens", default="32,128,512")
    parser.add_argument("--batch_sizes", default="1,8", help="prompts generated together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def build_model(preset: str, device: str, scratch: Path):
    """(Segmenter in eval mode on `device`, tokenizer)."""
    if preset == "tiny":
        model, tokenizer = build_tiny_segmenter(scratch, seed=0, lora_r=0)
        return model.to(device).eval(), tokenizer
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        llava = LlavaForConditionalGeneration(llava_config(tokenizer, LLAMA_7B, CLIP_L14_224))
        token_ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True)
        resize_embeddings_to_mean(llava, len(tokenizer))
        sam = build_sam(sam_config_from_preset("vit_h"))
        projector = build_projector(LLAMA_7B["hidden_size"], 256)
    model = Segmenter(llava, sam, projector, token_ids).to(torch.bfloat16)
    return model.eval(), tokenizer


def prompt_batch(model: Segmenter, tokenizer, batch_size: int, device: str):
    """`batch_size` copies of one image + question, collated and moved to `device`."""
    clip_side = model.llava.config.vision_config.image_size
    sam_side = model.sam_input_size
    input_ids = tokenize_prompt(
        [(f"{IMAGE_PLACEHOLDER}\n{QUESTION}", None)],
        tokenizer,
        model.token_ids,
        image_token_count(model.llava.config),
        template_for(tokenizer, "llava_v1"),
    )
    generator = torch.Generator().manual_seed(0)
    sample = ProcessedSample(
        clip_pixels=torch.randn(3, clip_side, clip_side, generator=generator),
        sam_pixels=torch.randn(3, sam_side, sam_side, generator=generator),
        resized_size=(sam_side * IMAGE_SIZE[0] // IMAGE_SIZE[1], sam_side),
        original_size=IMAGE_SIZE,
        input_ids=[input_ids],
        labels=[torch.zeros_like(input_ids)],
        masks=torch.zeros(0, *IMAGE_SIZE, dtype=torch.uint8),
        image_path="benchmark",
        source="benchmark",
    )
    batch = replace(collate([sample] * batch_size, model.token_ids.pad), labels=None, gt_masks=None)
    dtype = next(model.llava.parameters()).dtype
    return batch.to(device, dtype), len(input_ids)


def timed(model, batch, new_tokens: int, use_cache: bool, device: str, repeats: int):
    """(best seconds over `repeats`, the Generation)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = generate(model, batch, max_new_tokens=new_tokens, use_cache=use_cache)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def same_output(first, second) -> bool:
    """Identical tokens and masks (binarised) for every conversation and image."""
    tokens = all(torch.equal(a, b) for a, b in zip(first.sequences, second.sequences, strict=True))
    masks = all(
        torch.equal(a > 0, b > 0) for a, b in zip(first.pred_masks, second.pred_masks, strict=True)
    )
    return tokens and masks


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = build_model(args.preset, args.device, Path(scratch))
    model.token_ids = replace(model.token_ids, eos=NO_EOS)  # every answer runs to its length
    runs = []
    for batch_size in (int(value) for value in args.batch_sizes.split(",")):
        batch, prompt_tokens = prompt_batch(model, tokenizer, batch_size, args.device)
        generate(model, batch, max_new_tokens=2)  # warm-up
        for new_tokens in (int(value) for value in args.new_tokens.split(",")):
            repeats = REPEATS[args.preset]
            cached, with_cache = timed(model, batch, new_tokens, True, args.device, repeats)
            rerun, without = timed(model, batch, new_tokens, False, args.device, repeats)
            runs.append(
                {
                    "batch_size": batch_size,
                    "new_tokens": new_tokens,
                    "prompt_tokens": prompt_tokens,
                    "cached_seconds_per_answer": cached / batch_size,
                    "rerun_seconds_per_answer": rerun / batch_size,
                    "cached_tokens_per_s": new_tokens * batch_size / cached,
                    "rerun_tokens_per_s": new_tokens * batch_size / rerun,
                    "speedup": rerun / cached,
                    "identical_output": same_output(with_cache, without),
                }
            )
    return {
        "preset": args.preset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }


def main() -> None:
    print_report(measure, parse())


if __name__ == "__main__":
    main()
