"""The web demo's answer function (app.py `respond`) without a browser: on a tiny merged model
rigged to answer with a `[SEG]` and a `[REJ]`, the reply holds the text, an overlay that differs
from the image exactly on the mask, one table row per target, and one-line messages for a bad
image, a missing or over-long question, and an unexpected failure. Also the overlay drawing,
the phrase reading and the examples directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

import app
from tests.helpers import write_rigged_checkpoint
from utils.inference import (
    OVERLAY_ALPHA,
    OVERLAY_COLOURS,
    Segmentation,
    Target,
    overlay_targets,
    target_phrases,
)

QUESTION = "Please segment the red circle in this image."
ANSWER = "the red circle:[SEG] and blue square [REJ]."
IMAGE_SIZE = (48, 64)  # (H, W)
GRAY = 100


def write_png(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def write_test_image(directory: Path) -> Path:
    """A random 48 x 64 RGB PNG (seed 0), the image the model is rigged on."""
    rng = np.random.default_rng(0)
    return write_png(directory / "image.png", rng.integers(0, 256, (*IMAGE_SIZE, 3), np.uint8))


@pytest.fixture(scope="module")
def rigged(tiny_dir, tmp_path_factory) -> tuple[Segmentation, Path]:
    """(the rigged tiny model, loaded as app.py loads it; its image)."""
    directory = tmp_path_factory.mktemp("app")
    image = write_test_image(directory)
    checkpoint = write_rigged_checkpoint(tiny_dir, directory / "ckpt", image, QUESTION, ANSWER)
    return Segmentation.load(str(checkpoint), precision="fp32", device="cpu"), image


def test_the_reply_has_the_text_the_masks_over_the_image_and_a_row_per_target(rigged) -> None:
    segmentation, image = rigged
    reply = app.respond(segmentation, str(image), QUESTION)
    assert reply.message == ""
    assert reply.text == ANSWER
    expected = segmentation.answer([(image, QUESTION)])[0].targets
    mask = expected[0].mask
    assert 0 < mask.sum() < mask.size  # a real mask, neither empty nor the whole image
    original = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    changed = (reply.overlay != original).any(axis=2)
    assert np.array_equal(changed, mask)
    assert reply.rows == [
        ["0", "[SEG]", "red", "the red circle", f"{expected[0].score:.3f}"]
        + [f"{int(mask.sum())} pixels"],
        ["1", "[REJ]", "-", "blue square", "-", "absent"],
    ]


def test_an_array_image_gets_the_same_answer_as_its_file(rigged) -> None:
    segmentation, image = rigged
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    from_file = app.respond(segmentation, str(image), QUESTION)
    from_array = app.respond(segmentation, rgb, QUESTION)
    assert from_array.text == from_file.text and from_array.rows == from_file.rows
    assert np.array_equal(from_array.overlay, from_file.overlay)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "This file is not a readable image"),
        (b"not an image at all", "This file is not a readable image"),
        (b"\xff\xd8\xff\xe0 a JPEG that stops", "This file is not a readable image"),
    ],
    ids=["empty", "text", "truncated_jpeg"],
)
def test_an_unreadable_file_gets_one_line(rigged, tmp_path, content, message) -> None:
    segmentation, _ = rigged
    path = tmp_path / "upload.jpg"
    path.write_bytes(content)
    reply = app.respond(segmentation, str(path), QUESTION)
    assert reply.message.startswith(message) and "\n" not in reply.message
    assert reply.text == "" and reply.overlay is None and reply.rows == []


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (None, "Upload an image or pick an example first."),
        (np.zeros((32, 32), np.float32), "Unsupported image mode (float32, 2 dimensions)"),
        (np.zeros((32, 32, 2), np.uint8), "Unsupported image mode (2 channels)"),
        (np.zeros((32, 32, 3, 1), np.uint8), "Unsupported image mode (uint8, 4 dimensions)"),
        (np.zeros((15, 64, 3), np.uint8), "The image is too small (64 x 15 pixels)"),
    ],
    ids=["none", "float", "two_channels", "four_dims", "too_small"],
)
def test_a_bad_image_gets_one_line(rigged, image, message) -> None:
    segmentation, _ = rigged
    reply = app.respond(segmentation, image, QUESTION)
    assert reply.message.startswith(message) and "\n" not in reply.message
    assert reply.overlay is None


def test_a_too_small_file_gets_its_size(rigged, tmp_path) -> None:
    segmentation, _ = rigged
    path = write_png(tmp_path / "small.png", np.zeros((20, 8, 3), np.uint8))
    reply = app.respond(segmentation, str(path), QUESTION)
    assert reply.message == (
        "The image is too small (8 x 20 pixels): it needs at least 16 pixels on each side."
    )


@pytest.mark.parametrize("channels", [1, 4])
def test_gray_and_rgba_arrays_are_read_as_rgb(channels) -> None:
    image = np.arange(16 * 16 * channels, dtype=np.uint8).reshape(16, 16, channels)
    rgb = app.load_image(image)
    assert rgb.shape == (16, 16, 3)
    expected = np.repeat(image, 3, axis=2) if channels == 1 else image[..., :3]
    assert np.array_equal(rgb, expected)


def test_the_question_limit_counts_tokens_with_the_image(rigged) -> None:
    segmentation, _ = rigged
    length = len(segmentation.prompt_ids(QUESTION))
    room = segmentation.max_length - length  # max_new_tokens that just fits
    assert app.check_question(segmentation, f"  {QUESTION} ", room) == QUESTION
    with pytest.raises(app.BadRequest) as error:
        app.check_question(segmentation, QUESTION, room + 1)
    assert str(error.value) == (
        f"The question is too long: {length} tokens with the image, and this model reads at "
        f"most {length - 1} before its answer ({segmentation.max_length} in all, {room + 1} kept "
        "for the answer). Shorten it."
    )


def test_an_over_long_or_empty_question_gets_one_line(rigged) -> None:
    segmentation, image = rigged
    long_question = "red circle " * segmentation.max_length
    reply = app.respond(segmentation, str(image), long_question)
    assert reply.message.startswith("The question is too long: ") and reply.overlay is None
    assert app.respond(segmentation, str(image), "  ").message == (
        "Type a question about the image."
    )


def test_an_unexpected_failure_is_logged_and_the_page_gets_one_line(
    rigged, monkeypatch, caplog
) -> None:
    segmentation, image = rigged

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in a kernel")

    monkeypatch.setattr(segmentation, "answer", broken)
    with caplog.at_level(logging.ERROR, logger="app"):
        reply = app.respond(segmentation, str(image), QUESTION)
    assert reply.message == app.FAILURE_MESSAGE and reply.text == ""
    assert "out of memory in a kernel" in caplog.text and "Traceback" in caplog.text


def test_overlay_targets_tints_each_mask_in_its_colour_and_nothing_else() -> None:
    image = np.full((10, 10, 3), GRAY, np.uint8)
    first, second = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    first[1:6, 1:6] = True
    second[4:9, 4:9] = True
    targets = [
        Target(0, True, first, 0.9),
        Target(1, False, None, None),
        Target(2, True, second, 0.5),
    ]
    drawn = overlay_targets(image, targets)
    assert np.array_equal((drawn != image).any(axis=2), first | second)
    # interior pixels: GRAY blended with the target's colour; borders: the colour itself
    blend = [int((1 - OVERLAY_ALPHA) * GRAY + OVERLAY_ALPHA * c) for c in OVERLAY_COLOURS[0]]
    assert drawn[2, 2].tolist() == blend
    assert drawn[1, 1].tolist() == list(OVERLAY_COLOURS[0])
    assert drawn[8, 8].tolist() == list(OVERLAY_COLOURS[2])  # the [REJ] took no colour
    assert drawn[5, 5].tolist() != drawn[2, 2].tolist()  # the later mask is on top
    assert np.array_equal(image, np.full((10, 10, 3), GRAY, np.uint8))  # input untouched


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("Sure, the red circle:[SEG], blue square [REJ].", ["the red circle", "blue square"]),
        ("Sure, [SEG].", [""]),
        ("Sure, it is the red circle [SEG].", ["the red circle"]),
        (
            "The segmentation results are the star [SEG], and the mask of a tree is [REJ].",
            ["the star", "a tree"],
        ),
        ("Sure, the referred green car is [SEG].", ["green car"]),
        ("no target here", []),
    ],
)
def test_target_phrases(text, phrases) -> None:
    assert target_phrases(text) == phrases


def test_examples_come_from_examples_json_or_every_image(tmp_path) -> None:
    for name in ("b.png", "a.jpg"):
        write_png(tmp_path / name, np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an example")
    assert app.read_examples(tmp_path) == [
        [str(tmp_path / "a.jpg"), app.DEFAULT_EXAMPLE_QUESTION],
        [str(tmp_path / "b.png"), app.DEFAULT_EXAMPLE_QUESTION],
    ]
    records = [{"image": "b.png", "question": "Where is the circle?"}]
    (tmp_path / "examples.json").write_text(json.dumps(records))
    assert app.read_examples(tmp_path) == [[str(tmp_path / "b.png"), "Where is the circle?"]]
    (tmp_path / "examples.json").write_text(json.dumps([{"image": "b.png"}]))
    with pytest.raises(ValueError, match=r"examples.json, entry 0: expected an object"):
        app.read_examples(tmp_path)


def test_the_examples_default_to_the_demo_chat_images_beside_the_model(tmp_path) -> None:
    (tmp_path / "merged").mkdir()
    assert app.examples_directory("", str(tmp_path / "merged")) is None
    (tmp_path / "chat").mkdir()
    assert app.examples_directory("", str(tmp_path / "merged")) == tmp_path / "chat"
    assert app.examples_directory(str(tmp_path), "elsewhere") == tmp_path


def test_the_page_runs_one_request_at_a_time_and_shows_the_reply() -> None:
    reply = app.Reply("an answer", np.zeros((2, 2, 3), np.uint8), [["0"]], "")
    asked = []

    def answer(image, question):
        asked.append((image, question))
        return reply

    page = app.build_ui(answer, [])
    events = list(page.fns.values())
    assert len(events) == 2  # the button and Enter in the question box
    for event in events:
        assert event.concurrency_limit == 1 and event.concurrency_id == app.MODEL_QUEUE
    assert page._queue.max_size == app.MAX_QUEUE_SIZE
    shown = events[0].fn("image.png", "Where?")
    assert asked == [("image.png", "Where?")]
    assert shown == ("an answer", reply.overlay, [["0"]], "")
