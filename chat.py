"""Ask the segmenter about images: `python chat.py --version <merged checkpoint> ...`.

- `--image IMG --prompt TEXT`: one answer; its text is printed and, per generated `[SEG]`, a mask
  PNG and an overlay PNG are written to `--vis_save_path` (a `[REJ]` prints "not present").
- `--input_jsonl F --output_jsonl G`: batch mode; each line {"image": ..., "prompt": ...} gets a
  line with the text, the mask/overlay files and per-mask scores, `--batch_size` at a time.
- neither: an interactive loop like the LISA chat (empty prompt or Ctrl-D ends it).
Generation is greedy with the KV cache; LISA's chat flags are accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.builder import PRECISIONS
from utils.flags import CONV_TYPES
from utils.inference import Segmentation, describe, device_default, save_answer

LOGGER = logging.getLogger("chat")
LISA_CHAT_FLAGS = ("--image_size", "--model_max_length", "--lora_r")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    add = parser.add_argument
    add("--version", default="xinlai/LISA-13B-llama2-v1", help="merged checkpoint directory")
    add("--precision", default="bf16", choices=sorted(PRECISIONS))
    add("--vis_save_path", default="./vis_output", help="where mask and overlay PNGs go")
    add("--image", default="", help="image file (with --prompt: one answer, then exit)")
    add("--prompt", default="", help="question about --image")
    add("--input_jsonl", default="", help='batch mode: lines of {"image": ..., "prompt": ...}')
    add("--output_jsonl", default="", help="batch mode: one result line per input line")
    add("--batch_size", default=8, type=int, help="prompts generated together in batch mode")
    add("--max_new_tokens", default=512, type=int)
    add("--conv_type", default=None, choices=CONV_TYPES, help="default: the checkpoint's")
    add("--vision_pretrained", default="", help="SAM checkpoint, only for a plain LLaVA --version")
    add(
        "--vision-tower",
        "--vision_tower",
        dest="vision_tower",
        default=None,
        help="CLIP directory, for a LISA-format or LLaVA-v1 --version",
    )
    add("--device", default=None, help=f"default: {device_default()}")
    add("--load_in_8bit", action="store_true")
    add("--load_in_4bit", action="store_true")
    add("--use_mm_start_end", default=True, action=argparse.BooleanOptionalAction)
    add("--local_rank", "--local-rank", dest="local_rank", default=0, type=int)
    for flag in LISA_CHAT_FLAGS:
        add(flag, default=None, help=argparse.SUPPRESS)
    return parser


def read_requests(path: Path) -> list[tuple[str, str]]:
    """(image, prompt) per line of a JSONL file; errors name the line and the missing field."""
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            requests.append((str(record["image"]), str(record["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}, line {number}: expected a JSON object with 'image' and 'prompt' "
                f"({type(error).__name__}: {error})"
            ) from error
    return requests


def run_batch(segmentation: Segmentation, options: argparse.Namespace) -> None:
    """Batch mode: answer every request of --input_jsonl into --output_jsonl."""
    requests = read_requests(Path(options.input_jsonl))
    output = Path(options.output_jsonl)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as handle:
        for start in range(0, len(requests), options.batch_size):
            chunk = requests[start : start + options.batch_size]
            answers = segmentation.answer(chunk, options.max_new_tokens)
            for offset, answer in enumerate(answers):
                stem = f"{start + offset:06d}_{Path(answer.image_path).stem}"
                record = save_answer(answer, options.vis_save_path, stem)
                handle.write(json.dumps(record) + "\n")
    print(f"{len(requests)} answers written to {output}", flush=True)


def answer_one(segmentation: Segmentation, image: str, prompt: str, options, number: int) -> None:
    answer = segmentation.answer([(image, prompt)], options.max_new_tokens)[0]
    record = save_answer(answer, options.vis_save_path, f"{number:03d}_{Path(image).stem}")
    print(describe(answer), flush=True)
    for target in record["targets"]:
        if target["present"]:
            print(f"  saved {target['mask']} and {target['overlay']}", flush=True)


def interactive(segmentation: Segmentation, options: argparse.Namespace) -> None:
    """LISA-style loop: a prompt, then an image path, until an empty prompt or end of input."""
    for number in range(sys.maxsize):
        try:
            prompt = input("Please input your prompt: ").strip()
            if not prompt:
                return
            image = input("Please input the image path: ").strip()
        except EOFError:
            return
        if not Path(image).is_file():
            print(f"File not found: {image}", flush=True)
            continue
        answer_one(segmentation, image, prompt, options, number)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.load_in_8bit or options.load_in_4bit:
        parser.error(
            "--load_in_8bit/--load_in_4bit (bitsandbytes quantisation) are not supported yet; "
            "use --precision bf16 or fp16"
        )
    if bool(options.input_jsonl) != bool(options.output_jsonl):
        parser.error("--input_jsonl and --output_jsonl go together")
    if bool(options.image) != bool(options.prompt):
        parser.error("--image and --prompt go together")
    segmentation = Segmentation.load(
        options.version,
        options.precision,
        options.device,
        options.conv_type,
        options.vision_pretrained,
        options.vision_tower,
    )
    if options.input_jsonl:
        run_batch(segmentation, options)
    elif options.image:
        answer_one(segmentation, options.image, options.prompt, options, 0)
    else:
        interactive(segmentation, options)


if __name__ == "__main__":
    main()
