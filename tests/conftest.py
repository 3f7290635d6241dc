"""Shared fixtures: tiny model assets written once per test session (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `llava_tiny/` and `vision_pretrained/sam_tiny.pth`."""
    from model.tiny import tiny_model_config, write_tiny_llava, write_tiny_sam

    directory = tmp_path_factory.mktemp("tiny_assets")
    config = tiny_model_config(directory)
    write_tiny_llava(config.version, seed=0)
    write_tiny_sam(config.vision_pretrained, seed=0)
    return directory


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tools/make_tiny_assets.py` output (dataset, tiny LLaVA, tiny SAM), written once per
    session; tests only read it (runs go to their own temporary directories)."""
    from tools.make_tiny_assets import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("assets"), seed=0)


@pytest.fixture(scope="session")
def launched_run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the real DeepSpeed launcher on two CPU ranks (ZeRO-2, MMR README flags, 8
    steps, the padding-free `--packing` pass), shared by the launcher and merge tests. Returns
    its run directory."""
    from tests.e2e import launch_two_ranks

    runs = tmp_path_factory.mktemp("launched")
    return launch_two_ranks(assets, runs, "M2SA", zero_stage=2, extra=("--packing",))
