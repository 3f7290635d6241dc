"""The web demo in a real browser: app.py runs as a subprocess on a free port with a tiny merged
model rigged to answer with a `[SEG]` and a `[REJ]`; headless Chromium (Debian's package, driven
by Playwright) uploads an image, submits the question and waits for the answer. The page must
show the answer's text, the target table, and an image (downloaded from the page) that differs
from the upload exactly on the mask. A screenshot goes to docs/app_screenshot.png when
SAVE_APP_SCREENSHOT=1, else to the test's temporary directory.

`make test` installs the browser (`apt-get install chromium`) when it is missing and it runs as
root; elsewhere this test skips, saying so.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.e2e import ROOT
from tests.helpers import write_rigged_checkpoint
from tools.tiny_assets.shapes_world import generate_scene
from utils.inference import Segmentation

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "Please segment the red circle in this image."
ANSWER = "the red circle:[SEG] and blue square [REJ]."
IMAGE_SIZE = (240, 320)  # (H, W): large enough to see in the screenshot
SCENE_OBJECTS = (3, 4)
STARTUP_SECONDS = 90
POLL_SECONDS = 0.5
ANSWER_TIMEOUT_MS = 60_000
SCREENSHOT_ENV = "SAVE_APP_SCREENSHOT"
SCREENSHOT = ROOT / "docs" / "app_screenshot.png"
VIEWPORT = {"width": 1280, "height": 900}
MESSAGE = "#message [data-testid=markdown]"  # its text, not the progress timer beside it
SCREENSHOT_COLOURS = 256  # the committed screenshot is palette-quantised to stay small

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"{CHROMIUM} is missing: `make test` installs it as root "
    "(apt-get install --no-install-recommends chromium)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=POLL_SECONDS) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(POLL_SECONDS)
    pytest.fail(f"app.py did not serve {url} in {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    """app.py serving the rigged model: (its URL, the image, the checkpoint)."""
    directory = tmp_path_factory.mktemp("app_browser")
    height, width = IMAGE_SIZE
    scene = generate_scene(np.random.default_rng(0), width, height, SCENE_OBJECTS)
    image = directory / "upload.png"
    cv2.imwrite(str(image), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    checkpoint = write_rigged_checkpoint(tiny_dir, directory / "ckpt", image, QUESTION, ANSWER)
    port = free_port()
    log = directory / "app.log"
    command = [sys.executable, "app.py", f"--version={checkpoint}", f"--port={port}"]
    command.append(f"--examples={directory}")  # the upload doubles as an example
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as output:
        server = subprocess.Popen(
            command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server, log)
        yield url, image, checkpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def save_screenshot(page, path: Path) -> None:
    """A full-page PNG; the one for docs/ with a 256-colour palette (a quarter of the bytes)."""
    from PIL import Image

    page.screenshot(path=str(path), full_page=True)
    if path == SCREENSHOT:
        with Image.open(path) as shot:
            quantised = shot.convert("RGB").quantize(SCREENSHOT_COLOURS)
        quantised.save(path, optimize=True)


def read_rgb(data: bytes) -> np.ndarray:
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None, "the page's output image is not a decodable image"
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright, shared by the module's tests."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served) -> Iterator[object]:
    """A fresh tab on the demo's page."""
    tab = browser.new_page(viewport=VIEWPORT)
    tab.goto(served[0])
    yield tab
    tab.close()


def ask(page, image: Path, question: str) -> None:
    """Upload `image`, type `question`, press the button, and wait for the answer or message."""
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    page.locator("#input-image img").wait_for(state="attached")  # the upload's preview
    page.locator("#question textarea").fill(question)
    page.locator("#submit").click()
    page.wait_for_function(
        "() => document.querySelector('#answer textarea').value.length > 0"
        f" || document.querySelector('{MESSAGE}').innerText.trim().length > 0",
        timeout=ANSWER_TIMEOUT_MS,
    )


def test_the_page_answers_with_the_masks_drawn_over_the_upload(served, page, tmp_path) -> None:
    url, image, checkpoint = served
    expected = Segmentation.load(str(checkpoint), "fp32", "cpu").answer([(image, QUESTION)])[0]
    ask(page, image, QUESTION)
    output = page.locator("#output-image img")
    output.wait_for()
    source = output.get_attribute("src")
    drawn = read_rgb(page.request.get(source if "://" in source else url + source).body())
    shot = SCREENSHOT if os.environ.get(SCREENSHOT_ENV) == "1" else tmp_path / "app.png"
    save_screenshot(page, shot)
    assert page.locator("#answer textarea").input_value() == ANSWER
    assert page.locator(MESSAGE).inner_text().strip() == ""
    table = page.locator("#targets").inner_text()
    assert "the red circle" in table and "absent" in table
    assert f"{expected.targets[0].score:.3f}" in table
    original = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    assert drawn.shape == original.shape
    mask = expected.targets[0].mask
    assert 0 < mask.sum() < mask.size
    assert np.array_equal((drawn != original).any(axis=2), mask)


def test_an_unreadable_upload_gets_one_line_and_no_traceback(page, tmp_path) -> None:
    upload = tmp_path / "broken.png"
    upload.write_bytes(b"this is not a picture")
    ask(page, upload, QUESTION)
    assert page.locator(MESSAGE).inner_text().strip() == (
        "This file is not a readable image (damaged, truncated or not an image): "
        "upload a PNG or JPEG."
    )
    assert page.locator("#answer textarea").input_value() == ""
    assert "Traceback" not in page.content()
