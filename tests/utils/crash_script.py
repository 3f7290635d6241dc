"""A real process killed inside `save_checkpoint`, run by tests/test_crashes.py.

One CPU rank trains the tiny segmenter, saves checkpoint A, trains STEPS_AFTER_SAVE more steps
(their losses, what a run resumed from A must reproduce, go to expected.json with the trained
weights at B), then saves B with `utils.engine.CRASH_POINT_ENV` set: the save stops at that
stage, writes its marker and sleeps until the test SIGKILLs the process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.tiny import build_tiny_segmenter  # noqa: E402
from tests.utils.engine_script import FLAGS, rank_batch, train  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.engine import (  # noqa: E402
    CRASH_POINT_ENV,
    CRASH_POINTS,
    checkpoint_tag,
    init_engine,
    save_checkpoint,
)

STEPS_BEFORE_SAVE = 3
STEPS_AFTER_SAVE = 2
SCORES = (0.25, 0.5)  # B beats A, so a save of B also rewrites best.json
EXPECTED_FILE = "expected.json"
TRAINED_FILE = "trained_b.pt"


def trainable(engine) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in engine.module.named_parameters()
        if parameter.requires_grad
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny_dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--crash_point", choices=CRASH_POINTS, required=True)
    args = parser.parse_args()
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    model, tokenizer = build_tiny_segmenter(args.tiny_dir, seed=0)
    engine = init_engine(model, parse_args(FLAGS), world_size=1)
    batch = rank_batch(model, tokenizer, rank=0)
    directory = args.output / "ckpt_model"
    train(engine, batch, STEPS_BEFORE_SAVE)
    tag_a = checkpoint_tag(engine.global_steps)
    save_checkpoint(engine, directory, tag_a, {"epoch": 0}, SCORES[0])
    losses = train(engine, batch, STEPS_AFTER_SAVE)
    tag_b = checkpoint_tag(engine.global_steps)
    torch.save(trainable(engine), args.output / TRAINED_FILE)
    expected = {"tag_a": tag_a, "tag_b": tag_b, "losses_after_a": losses}
    (args.output / EXPECTED_FILE).write_text(json.dumps(expected))
    os.environ[CRASH_POINT_ENV] = args.crash_point
    save_checkpoint(engine, directory, tag_b, {"epoch": 1}, SCORES[1])
    raise SystemExit(f"the save of {tag_b} did not stop at {args.crash_point}")


if __name__ == "__main__":
    main()
