"""Web demo: `python app.py --version <merged checkpoint> [--port 7860]`, then open the address.

Upload an image (or pick an example), ask a question; the page shows the answer's text, the
image with each `[SEG]` mask drawn in its own colour, and a table of the targets (colour, phrase,
mask score; a `[REJ]` target is listed as absent). The model serves one request at a time (a
Gradio queue); a bad image or an over-long question gets a one-line message, and any other
failure is logged here with its traceback while the page shows one line.

- `--version DIR`: a merged checkpoint (merge_lora_weights_and_save_hf_model.py's output); with
  `--weight W` the training run's weights are merged into a temporary directory first.
- `--examples DIR`: images and an optional examples.json, [{"image": "a.jpg", "question": ...}]
  (image names relative to DIR); default: `make demo`'s chat images beside the merged model
  (`runs/demo/chat` for `runs/demo/merged`), when present.
- `--host 127.0.0.1` (local only) by default; `--host 0.0.0.0` serves the network.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.builder import PRECISIONS
from utils.datasets.base import DataError, read_image
from utils.inference import (
    Answer,
    Segmentation,
    device_default,
    overlay_colour_name,
    overlay_targets,
    target_phrases,
)

if TYPE_CHECKING:  # Gradio is imported where the page is built (importing app stays light)
    import gradio as gr

LOGGER = logging.getLogger("app")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_NEW_TOKENS = 512
MODEL_CONCURRENCY = 1  # one request at a time on the model; the others wait in the queue
MODEL_QUEUE = "model"  # the concurrency group every event that runs the model joins
MAX_QUEUE_SIZE = 32
MIN_IMAGE_SIDE = 16  # pixels; smaller images hold too little for the image encoders
RGB_CHANNELS = 3
GRAY_CHANNELS = 1
RGBA_CHANNELS = 4
EXAMPLES_FILE = "examples.json"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEMO_CHAT_DIRECTORY = "chat"  # tools/demo.py writes its chat images here, beside "merged"
DEFAULT_EXAMPLE_QUESTION = "What is in this image? Please output segmentation mask."
TARGET_COLUMNS = ["#", "token", "colour", "phrase", "mask score", "result"]
IMAGE_HEIGHT = 360  # pixels on the page
NO_PHRASE = "-"
FAILURE_MESSAGE = "The model failed on this request; the server log has the details."
ANALYTICS_VARIABLE = "GRADIO_ANALYTICS_ENABLED"  # a local demo sends nothing out unless asked
TITLE = "Reasoning segmentation"
DESCRIPTION = (
    "Upload an image or pick an example, ask about it, and press **Segment**. Each `[SEG]` of "
    "the answer is drawn in its own colour; a `[REJ]` names a target that is not in the image."
)


class BadRequest(ValueError):
    """A request the model cannot answer (bad image, missing or over-long question); its
    message is the one line the page shows."""


@dataclass
class Reply:
    """What the page shows for one request.

    overlay: uint8 RGB [H, W, 3], the masks over the image (None when there is no answer).
    rows: one row per target, TARGET_COLUMNS. message: "" or the one line explaining a failure.
    """

    text: str = ""
    overlay: np.ndarray | None = None
    rows: list[list[str]] = field(default_factory=list)
    message: str = ""


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a uint8 gray [H, W] / [H, W, 1], RGB or RGBA array."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise BadRequest(
            f"Unsupported image mode ({image.dtype}, {image.ndim} dimensions): "
            "expected 8-bit gray, RGB or RGBA."
        )
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[2]
    if channels == GRAY_CHANNELS:
        return np.repeat(image, RGB_CHANNELS, axis=2)
    if channels in (RGB_CHANNELS, RGBA_CHANNELS):
        return np.ascontiguousarray(image[..., :RGB_CHANNELS])
    raise BadRequest(
        f"Unsupported image mode ({channels} channels): expected 8-bit gray, RGB or RGBA."
    )


def load_image(image: str | Path | np.ndarray | None) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an uploaded file or array; BadRequest when it cannot serve."""
    if image is None or (isinstance(image, str) and not image):
        raise BadRequest("Upload an image or pick an example first.")
    if isinstance(image, np.ndarray):
        rgb = as_rgb(image)
    else:
        try:
            rgb = read_image(image)
        except DataError as error:
            LOGGER.info("unreadable upload: %s", error)
            raise BadRequest(
                "This file is not a readable image (damaged, truncated or not an image): "
                "upload a PNG or JPEG."
            ) from error
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise BadRequest(
            f"The image is too small ({width} x {height} pixels): it needs at least "
            f"{MIN_IMAGE_SIDE} pixels on each side."
        )
    return rgb


def check_question(segmentation: Segmentation, question: str, max_new_tokens: int) -> str:
    """The stripped question; BadRequest when empty or when it leaves the answer no room."""
    question = (question or "").strip()
    if not question:
        raise BadRequest("Type a question about the image.")
    length = len(segmentation.prompt_ids(question))
    room = segmentation.max_length - max_new_tokens
    if length > room:
        raise BadRequest(
            f"The question is too long: {length} tokens with the image, and this model reads at "
            f"most {room} before its answer ({segmentation.max_length} in all, "
            f"{max_new_tokens} kept for the answer). Shorten it."
        )
    return question


def target_rows(answer: Answer) -> list[list[str]]:
    """One row per `[SEG]`/`[REJ]` of the answer, in order (TARGET_COLUMNS)."""
    phrases = target_phrases(answer.text)
    rows = []
    for target in answer.targets:
        phrase = phrases[target.index] if target.index < len(phrases) else ""
        phrase = phrase or NO_PHRASE
        if target.present:
            colour, score = overlay_colour_name(target.index), f"{target.score:.3f}"
            row = ["[SEG]", colour, phrase, score, f"{int(target.mask.sum())} pixels"]
        else:
            row = ["[REJ]", NO_PHRASE, phrase, NO_PHRASE, "absent"]
        rows.append([str(target.index), *row])
    return rows


def respond(
    segmentation: Segmentation,
    image: str | Path | np.ndarray | None,
    question: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Reply:
    """The answer to one (image, question), or a Reply with a one-line message; never raises
    (an unexpected failure is logged with its traceback)."""
    try:
        rgb = load_image(image)
        question = check_question(segmentation, question, max_new_tokens)
        answer = segmentation.answer([(rgb, question)], max_new_tokens)[0]
        return Reply(answer.text, overlay_targets(rgb, answer.targets), target_rows(answer))
    except BadRequest as error:
        return Reply(message=str(error))
    except Exception:  # the page shows one line; the traceback goes to the server's log
        LOGGER.exception("request failed (question %r)", question)
        return Reply(message=FAILURE_MESSAGE)


def read_examples(directory: Path) -> list[list[str]]:
    """[[image path, question], ...] from `directory`: its examples.json when present (image
    names relative to it), else every image with DEFAULT_EXAMPLE_QUESTION."""
    listing = directory / EXAMPLES_FILE
    if not listing.is_file():
        images = sorted(p for p in directory.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)
        return [[str(path), DEFAULT_EXAMPLE_QUESTION] for path in images]
    examples = []
    for number, record in enumerate(json.loads(listing.read_text())):
        try:
            path = directory / str(record["image"])
            question = str(record["question"])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{listing}, entry {number}: expected an object with 'image' and 'question' "
                f"({type(error).__name__}: {error})"
            ) from error
        if not path.is_file():
            raise ValueError(f"{listing}, entry {number}: image {path} does not exist")
        examples.append([str(path), question])
    return examples


def examples_directory(option: str, version: str) -> Path | None:
    """--examples when given; else make demo's chat images beside the merged model, if any."""
    if option:
        if not Path(option).is_dir():
            raise ValueError(f"--examples {option}: not a directory")
        return Path(option)
    demo_chat = Path(version).parent / DEMO_CHAT_DIRECTORY
    return demo_chat if demo_chat.is_dir() else None


def page_outputs(reply: Reply) -> tuple[str, np.ndarray | None, list[list[str]], str]:
    """The values of the page's (answer, masks, targets, message) components."""
    return reply.text, reply.overlay, reply.rows, reply.message


def pass_on_undecodable(image: gr.Image) -> gr.Image:
    """Make `image` hand an upload that Gradio cannot decode to the answer function as a file,
    which explains it in one line, instead of failing with a bare "Error" on the page.

    (An instance attribute, not a subclass: Gradio writes a .pyi stub beside the module of any
    component class it sees defined.)"""
    decode = image.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Exception:  # whatever PIL objects to, read_image decides and explains
            LOGGER.info("Gradio could not decode an upload; passing it on as a file")
            return str(payload.path) if payload is not None and payload.path else None

    image.preprocess = preprocess
    return image


def build_ui(answer: Callable[[str | None, str], Reply], examples: list[list[str]]) -> gr.Blocks:
    """The Gradio page around `answer(image file, question) -> Reply`; returns gr.Blocks."""
    import gradio as gr

    def submit(image: str | None, question: str) -> tuple:
        return page_outputs(answer(image, question))

    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        with gr.Row():
            with gr.Column():
                image = pass_on_undecodable(
                    gr.Image(
                        type="filepath",
                        label="Image",
                        sources=["upload"],
                        height=IMAGE_HEIGHT,
                        elem_id="input-image",
                    )
                )
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                button = gr.Button("Segment", variant="primary", elem_id="submit")
            with gr.Column():
                masks = gr.Image(
                    type="numpy",
                    format="png",
                    label="Masks",
                    interactive=False,
                    height=IMAGE_HEIGHT,
                    elem_id="output-image",
                )
                text = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                targets = gr.Dataframe(
                    headers=TARGET_COLUMNS, label="Targets", interactive=False, elem_id="targets"
                )
                message = gr.Markdown(elem_id="message")
        if examples:
            gr.Examples(examples, inputs=[image, question], label="Examples")
        outputs = [text, masks, targets, message]
        for event in (button.click, question.submit):
            event(
                submit,
                [image, question],
                outputs,
                concurrency_limit=MODEL_CONCURRENCY,
                concurrency_id=MODEL_QUEUE,
            )
    page.queue(default_concurrency_limit=MODEL_CONCURRENCY, max_size=MAX_QUEUE_SIZE)
    return page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    add = parser.add_argument
    add("--version", required=True, help="merged checkpoint (or base LLaVA with --weight)")
    add("--weight", default="", help="a training run's weights, merged into --version first")
    add("--precision", default=None, choices=sorted(PRECISIONS), help="default: bf16 on a GPU")
    add("--device", default=None, help=f"default: {device_default()}")
    add("--host", default=DEFAULT_HOST, help="127.0.0.1: this machine only")
    add("--port", default=DEFAULT_PORT, type=int)
    add("--examples", default="", help=f"images and an optional {EXAMPLES_FILE}")
    add("--max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS, type=int)
    return parser


def precision_default(device: str) -> str:
    """bf16 on an accelerator (as chat.py), fp32 on the CPU (half precision is slow there)."""
    return "fp32" if device == "cpu" else "bf16"


def merged_version(version: str, weight: str, scratch: Path) -> str:
    """`version` itself, or (with `weight`) the run merged into `scratch` as the merge script
    does (the run's config.json gives the LoRA settings)."""
    if not weight:
        return version
    from utils.merging import merge, resolve_merge_config

    save_path = scratch / "merged"
    argv = [f"--version={version}", f"--weight={weight}", f"--save_path={save_path}"]
    config, options = resolve_merge_config(argv)
    return str(merge(config, weight, str(save_path), options.max_shard_size))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = build_parser()
    options = parser.parse_args(argv)
    os.environ.setdefault(ANALYTICS_VARIABLE, "False")
    device = options.device or device_default()
    precision = options.precision or precision_default(device)
    try:
        directory = examples_directory(options.examples, options.version)
        examples = read_examples(directory) if directory else []
    except ValueError as error:
        parser.error(str(error))
    with tempfile.TemporaryDirectory(prefix="app_merged_") as scratch:
        version = merged_version(options.version, options.weight, Path(scratch))
        segmentation = Segmentation.load(version, precision, device)
        LOGGER.info("model %s on %s (%s), %d examples", version, device, precision, len(examples))
        answer = functools.partial(respond, segmentation, max_new_tokens=options.max_new_tokens)
        build_ui(answer, examples).launch(server_name=options.host, server_port=options.port)


if __name__ == "__main__":
    main()
