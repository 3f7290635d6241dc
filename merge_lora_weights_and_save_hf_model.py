"""Merge a training run's LoRA into its base LLaVA and save one Hugging Face checkpoint:
`python merge_lora_weights_and_save_hf_model.py --version BASE --weight W --save_path OUT`.

`--weight` is a `zero_to_fp32.py` output (file, or the directory newer DeepSpeed writes, maybe
sharded) or the run's `ckpt_model/` itself (no consolidation step needed). Settings not given
are read from the run's `config.json`. The output loads with `train_ds.py --eval_only --version
OUT` and `chat.py --version OUT`; its LLaVA part with plain `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import logging
import sys

from utils.merging import merge, resolve_merge_config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config, options = resolve_merge_config(sys.argv[1:] if argv is None else argv)
    path = merge(config, options.weight, options.save_path, options.max_shard_size)
    print(f"merged checkpoint written to {path}", flush=True)


if __name__ == "__main__":
    main()
