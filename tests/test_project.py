"""Project-level checks: pinned environments agree, the skeleton is in place, imports stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def test_conda_environment_pins_equal_requirements() -> None:
    environment = yaml.safe_load((ROOT / "M2SA.yaml").read_text())
    pip_section = next(
        item["pip"] for item in environment["dependencies"] if isinstance(item, dict)
    )
    assert pip_section == requirement_lines(ROOT / "requirements.txt")


def test_every_requirement_is_pinned_and_torch_is_2_13() -> None:
    lines = requirement_lines(ROOT / "requirements.txt") + requirement_lines(
        ROOT / "requirements-test.txt"
    )
    assert all("==" in line for line in lines), lines
    assert "torch==2.13.0" in lines
    assert not any(line.startswith(("torchvision", "flash-attn", "flash_attn")) for line in lines)


def test_skeleton_is_in_place() -> None:
    for path in (
        "README.md",
        "Makefile",
        "pyproject.toml",
        ".ci/run",
        "dataset/README.md",
        "vision_pretrained/README.md",
        "docs/ARCHITECTURE.md",
    ):
        assert (ROOT / path).is_file(), path
    assert "make test" in (ROOT / ".ci/run").read_text()
    ignored = (ROOT / ".gitignore").read_text()
    assert "runs/" in ignored and "dataset/*" in ignored and "vision_pretrained/*" in ignored


def test_importing_the_model_package_stays_light() -> None:
    code = (
        "import sys, model, model.tokens, model.losses, model.batch; "
        "heavy = ('deepspeed', 'peft', 'segment_anything', 'flash_attn', 'tensorboard'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
