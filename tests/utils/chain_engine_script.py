"""Two-rank ZeRO-3 check of chained decoding, run by `deepspeed --num_gpus 2` from
test_engine.py: each rank trains the tiny segmenter with a chain token on batches that differ in
what they hold (rank 0: chained answers, a plain `[SEG]` and a `[REJ]`; rank 1: no chain token
and no `[SEG]`, then the roles swap to a plain `[SEG]` against a chained `[REJ]`). ZeRO-3
gathers parameters per module call, so a rank that skipped the second decoder pass or the mask
embedding would leave the other waiting forever; the steps must complete. With
--partition_all every parameter is partitioned (none kept whole for being small). --segmenter
sam2 runs it with SAM 2, whose high-resolution convolutions run on every rank with the decoder.
Rank 0 writes result.json into --output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.tiny import build_tiny_segmenter  # noqa: E402
from tests.helpers import Conversation, make_batch  # noqa: E402
from tests.utils.engine_script import WORLD_SIZE, run_and_exit, train  # noqa: E402
from utils import engine as engine_module  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.engine import init_engine  # noqa: E402

CHAIN = "[SEG_SEMA]"
STEPS = 2
FLAGS = (
    "--precision fp32 --batch_size 1 --grad_accumulation_steps 1 --epochs 1 --steps_per_epoch 10"
    " --lr 0.01 --zero_stage 3"
).split()
SIZE = (40, 56)
# (conversations, [SEG]/[REJ] targets per conversation as is-[REJ] flags)
CHAINED = (
    [
        Conversation(0, "Where is the dog?", f"It usually appears on {CHAIN}. It is [SEG]."),
        Conversation(0, "Segment the circle and the cat.", "Sure, [SEG] and [REJ]."),
    ],
    [False, False, True],
)
NOTHING = ([Conversation(0, "What colour is the circle?", "It is red.")], [])
PLAIN = ([Conversation(0, "Segment the circle.", "Sure, [SEG].")], [False])
CHAINED_REJ = (
    [Conversation(0, "Where is the cat?", f"It usually appears on {CHAIN}. It is [REJ].")],
    [True],
)
# per phase, rank 0's and rank 1's batch
PHASES = [(CHAINED, NOTHING), (PLAIN, CHAINED_REJ)]


def rank_batch(model, tokenizer, content, rank: int):
    conversations, rej = content
    masks = torch.randint(0, 2, (len(rej), *SIZE), generator=torch.Generator().manual_seed(rank))
    masks[torch.tensor(rej, dtype=torch.bool)] = 0
    return make_batch(model, tokenizer, [SIZE], conversations, [masks.to(torch.uint8)], rank)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--partition_all", action="store_true")
    parser.add_argument("--segmenter", default="sam", choices=("sam", "sam2"))
    args = parser.parse_args()
    assets = args.output / "tiny_assets"
    if args.partition_all:
        engine_module.STAGE3_PARAM_PERSISTENCE_THRESHOLD = 0

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank = dist.get_rank()
    if rank == 0:  # writes the tiny assets once; the other rank reads them
        build_tiny_segmenter(assets, seed=0, segmenter=args.segmenter)
    dist.barrier()
    model, tokenizer = build_tiny_segmenter(
        assets, seed=0, segmenter=args.segmenter, chain_token=CHAIN
    )
    engine = init_engine(model, parse_args(FLAGS), WORLD_SIZE)
    partitioned = sum(parameter.numel() == 0 for parameter in engine.module.parameters())
    losses = [
        train(engine, rank_batch(model, tokenizer, phase[rank], rank), STEPS) for phase in PHASES
    ]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"losses": losses, "partitioned": partitioned})
    if rank == 0:
        result = {"world_size": dist.get_world_size(), "ranks": gathered}
        (args.output / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_and_exit(main)
