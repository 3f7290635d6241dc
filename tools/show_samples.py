"""Preview the training data: the items train_ds.py with the same flags draws, as JSON records,
statistics and pictures, to look at before a multi-day run starts.

    python tools/show_samples.py [train_ds.py flags] --num_samples N [--epoch E]
        [--world_size W] [--json OUT] [--stats] [--vis DIR]

Every train_ds.py flag is accepted and resolved over its recipe as train_ds.py resolves it
(`utils.config.resolve_config`: `--recipe lisa|gsva|m2sa|PATH`, then the command line), and the
training set is built by the same call (`utils.training.training_dataset`), so the samples shown
are items 0..N-1 of epoch E of that run: the same sources, the same (seed, epoch, index) draws.
No model is built; `--print_config` prints the resolved configuration and exits.

Tokenization: when `--version` names a model directory, its tokenizer and the number of image
tokens are read from its files as the model builder reads them (tokenizer files, config.json;
for LLaVA-v1 and LISA-family directories also the weight files, which `model.layouts` reads to
tell the two apart and to check the tokenizer against the embedding rows, and `--vision-tower`'s
config.json), and every sample is processed as in training (`utils.collate.SampleProcessor`,
`--model_max_length`, `--too_long`): token lengths, truncated and dropped conversations, and the
mixer's redraws of samples the processor rejects are those of training. Without one the token
statistics are skipped and the draws are still training's except where training's processor
would have rejected a sample: with `--too_long drop` a sample whose every conversation is too
long, with `--skip_bad_samples` a record that fails to tokenize (records say
"draws_may_differ").

Outputs (any of them; without one, a listing of the items goes to stdout):
- `--json OUT`: a JSON list, one record per item: {"index", "source" ("family/dataset"),
  "image" (path), "image_size" ([H, W]), "num_masks", "conversations", "token_lengths",
  "truncated_conversations", "dropped_conversations", "tokenized", "draws_may_differ"}.
  "conversations" has one entry per round, in order: {"conversation" (its index in the
  sample), "round" (its index in the conversation; VQA dialogues have several), "question",
  "answer" (the strings before the template and tokenization; the image as "<image>"),
  "num_seg", "num_rej"}. "token_lengths": one per conversation, image tokens included, before
  any cut (null without a tokenizer, as are the two conversation counts). With
  `--skip_bad_samples`, "skipped_records" counts the bad records skipped per source.
- `--stats`: a table on stdout (samples per family and per source, conversations per image,
  targets per question, token lengths per family, truncated and dropped conversations) and,
  with `--json OUT`, the same as a JSON object in OUT's sibling `<stem>.stats.json`.
- `--vis DIR`: `DIR/sample_<index>.png` per item: the image with each target mask in its own
  colour (ignore pixels darkened) and, below it, every question and answer with each
  `[SEG]`/`[REJ]` in its mask's colour.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
from tqdm import tqdm
from transformers import CLIPVisionConfig, PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from model.backbone import directory_family, image_token_count  # noqa: E402
from model.builder import segmentation_tokenizer  # noqa: E402
from model.checkpoint import read_segmenter_config  # noqa: E402
from model.layouts import (  # noqa: E402
    LEGACY_LAYOUTS,
    Layout,
    detect_layout,
    image_settings_directory,
    legacy_llava_config,
    legacy_segmentation_tokenizer,
    read_legacy_checkpoint,
)
from model.tokens import REJ_TOKEN, SEG_TOKEN, TokenIds  # noqa: E402
from tools.sample_pictures import render_preview  # noqa: E402
from utils.collate import (  # noqa: E402
    ProcessedSample,
    SampleProcessor,
    template_for,
    tokenize_conversation,
)
from utils.config import USAGE_ERROR, TrainConfig, build_parser, resolve_config  # noqa: E402
from utils.datasets.base import DataError, Sample  # noqa: E402
from utils.datasets.mixer import skipped_samples  # noqa: E402
from utils.preprocess import ImageProcessors  # noqa: E402
from utils.training import seed_everything, training_dataset  # noqa: E402

LOGGER = logging.getLogger("show_samples")
DATA_ERROR = 1  # bad data stops as train_ds.py stops on it
STATS_SUFFIX = ".stats.json"
VIS_NAME = "sample_{index:05d}.png"


@dataclass(frozen=True)
class Tokenization:
    """What tokenizing as training needs, read from `--version` without building the model."""

    tokenizer: PreTrainedTokenizerBase
    token_ids: TokenIds
    image_tokens: int | None  # None: each image's own count (Qwen-VL)
    images_directory: Path


@dataclass
class Preview:
    """One drawn item: the sample as the source made it and, when tokenized, as processed.

    token_lengths: per conversation, its token count before any cut (image tokens included).
    """

    sample: Sample
    processed: ProcessedSample | None = None
    token_lengths: list[int] | None = None


class PreviewProcessor:
    """The training `SampleProcessor` as the mixer's `process`, keeping the sample beside its
    result; its rejections (UnusableSample, errors) reach the mixer as in training."""

    def __init__(self, processor: SampleProcessor) -> None:
        self.processor = processor
        self.template = template_for(processor.tokenizer, processor.conv_type)

    def __call__(self, sample: Sample) -> Preview:
        processed = self.processor(sample)
        ids = self.processor.token_ids
        # the model's fixed count, or (Qwen-VL) this image's, which every conversation holds whole
        image_tokens = self.processor.image_tokens or int(
            (processed.input_ids[0] == ids.image).sum()
        )
        lengths = [
            len(
                tokenize_conversation(
                    rounds, self.processor.tokenizer, ids, image_tokens, self.template
                )[0]
            )
            for rounds in sample.conversations
        ]
        return Preview(sample, processed, lengths)


def tool_parser() -> argparse.ArgumentParser:
    """The flags of this tool alone (every other flag is train_ds.py's)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("show_samples.py")
    add = group.add_argument
    add("--num_samples", default=8, type=int, help="items 0..N-1 of the epoch (default 8)")
    add("--epoch", default=0, type=int, help="the epoch whose items are drawn (default 0)")
    add(
        "--world_size",
        default=1,
        type=int,
        help="GPUs of the training run: an epoch has batch_size x grad_accumulation_steps x "
        "steps_per_epoch x W items (--no_sampling: one pass); item i goes to rank i mod W",
    )
    add("--json", type=Path, help="write one JSON record per item here (module docstring)")
    add(
        "--stats",
        action="store_true",
        help="print counts and token lengths; with --json OUT also OUT's <stem>.stats.json",
    )
    add("--vis", type=Path, help="write DIR/sample_<index>.png per item: masks and text")
    return parser


class OneLineParser(argparse.ArgumentParser):
    """Bad flags stop with one line and argparse's usage status, not the 100-line usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def full_parser() -> argparse.ArgumentParser:
    """This tool's flags plus every train_ds.py flag (for --help and checking the command)."""
    return OneLineParser(
        prog=Path(sys.argv[0]).name if sys.argv[0] else "show_samples.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[tool_parser(), build_parser()],
        add_help=False,  # build_parser brings -h
        allow_abbrev=False,
    )


def parse_flags(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(this tool's options, the train_ds.py command line). Exits 2 with one line on a bad
    flag; the train_ds.py part is resolved later by `resolve_config`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = full_parser()
    parser.parse_args(argv)  # --help, unknown flags, wrong types and choices
    options, train_argv = tool_parser().parse_known_args(argv)
    if options.num_samples < 1 or options.epoch < 0 or options.world_size < 1:
        parser.error(
            f"--num_samples ({options.num_samples}) and --world_size ({options.world_size}) "
            f"must be at least 1, --epoch ({options.epoch}) at least 0"
        )
    return options, train_argv


def load_tokenization(config: TrainConfig) -> Tokenization | None:
    """The tokenizer with the segmentation tokens, their ids and the image-token count of
    `--version`, as `model.builder.load_backbone` sets them up, from the directory's files
    (None when `--version` is not a directory). No model is built."""
    if not Path(config.version).is_dir():
        return None
    layout = detect_layout(config.version)
    images = image_settings_directory(config.version, config.vision_tower, layout)
    if layout in LEGACY_LAYOUTS:
        checkpoint = read_legacy_checkpoint(config.version, layout)
        tokenizer, token_ids = legacy_segmentation_tokenizer(
            checkpoint, config.use_mm_start_end, config.chain_token or None, config.vocabulary
        )
        if not Path(config.vision_tower).is_dir():  # nothing is downloaded
            raise FileNotFoundError(
                f"--vision-tower {config.vision_tower!r} is not a local directory; this "
                f"{layout.value} checkpoint keeps CLIP outside, so its image-token count and "
                "image settings are read from that CLIP directory"
            )
        vision = CLIPVisionConfig.from_pretrained(config.vision_tower)
        llava = legacy_llava_config(checkpoint.config, vision, token_ids.image, len(tokenizer))
        return Tokenization(tokenizer, token_ids, image_token_count(llava), images)
    merged = read_segmenter_config(config.version) if layout is Layout.MERGED else None
    family = directory_family(config.version)
    tokenizer, token_ids = segmentation_tokenizer(
        config.version,
        config.use_mm_start_end,
        merged,
        config.chain_token or None,
        config.vocabulary,
        family.image_tokens,
    )
    backbone = family.model_class.config_class.from_pretrained(config.version)
    return Tokenization(tokenizer, token_ids, image_token_count(backbone), images)


def training_processor(config: TrainConfig, tokenization: Tokenization) -> SampleProcessor:
    """The processor train_ds.py trains with (`SampleProcessor.for_model`'s settings). The SAM
    input side is `--image_size` (the model's own needs its checkpoint); its pixels are not
    shown and decide nothing here."""
    return SampleProcessor(
        tokenizer=tokenization.tokenizer,
        token_ids=tokenization.token_ids,
        images=ImageProcessors.from_pretrained(
            tokenization.images_directory, config.image_size, config.min_pixels, config.max_pixels
        ),
        image_tokens=tokenization.image_tokens,
        conv_type=config.conv_type,
        model_max_length=config.model_max_length,
        too_long=config.too_long,
    )


def draw_previews(
    config: TrainConfig, processor: SampleProcessor | None, options: argparse.Namespace
) -> list[tuple[int, Preview, dict[str, int] | None]]:
    """(index, preview, bad records skipped before it) of items 0..N-1 of `options.epoch`,
    drawn from the training set exactly as train_ds.py builds it."""
    seed_everything(config.seed)
    process = PreviewProcessor(processor) if processor is not None else None
    dataset = training_dataset(config, process, options.world_size)
    dataset.set_epoch(options.epoch)
    count = options.num_samples
    if count > len(dataset):
        LOGGER.warning(
            "an epoch has %d items on %d GPU(s); showing those, not %d",
            len(dataset),
            options.world_size,
            count,
        )
        count = len(dataset)
    previews = []
    for index in tqdm(range(count), desc="drawing", file=sys.stderr, disable=count < 2):
        item = dataset[index]
        preview = item if isinstance(item, Preview) else Preview(item)
        previews.append((index, preview, skipped_samples(item)))
    return previews


def target_counts(text: str) -> tuple[int, int]:
    """(`[SEG]` count, `[REJ]` count) of a text."""
    return text.count(SEG_TOKEN), text.count(REJ_TOKEN)


def round_entries(sample: Sample) -> list[dict]:
    """One entry per round of every conversation, in order (module docstring)."""
    entries = []
    for conversation, rounds in enumerate(sample.conversations):
        for number, (question, answer) in enumerate(rounds):
            num_seg, num_rej = target_counts(answer)
            entries.append(
                {
                    "conversation": conversation,
                    "round": number,
                    "question": question,
                    "answer": answer,
                    "num_seg": num_seg,
                    "num_rej": num_rej,
                }
            )
    return entries


def preview_record(
    index: int, preview: Preview, skipped: dict[str, int] | None, may_differ: bool
) -> dict:
    """The JSON record of one item (module docstring)."""
    sample, processed = preview.sample, preview.processed
    record = {
        "index": index,
        "source": sample.source,
        "image": str(sample.image_path),
        "image_size": [int(side) for side in sample.image.shape[:2]],
        "num_masks": int(sample.masks.shape[0]),
        "conversations": round_entries(sample),
        "token_lengths": preview.token_lengths,
        "truncated_conversations": processed.truncated_conversations if processed else None,
        "dropped_conversations": processed.dropped_conversations if processed else None,
        "tokenized": processed is not None,
        "draws_may_differ": may_differ,
    }
    if skipped is not None:
        record["skipped_records"] = skipped
    return record


def family_of(source: str) -> str:
    return source.split("/", 1)[0]


def histogram(values: Sequence[int]) -> dict[str, int]:
    """{value: how often}, keys in increasing order (as strings, for JSON)."""
    return {str(value): count for value, count in sorted(Counter(values).items())}


def compute_stats(records: Sequence[dict]) -> dict:
    """Counts over the records: samples per family and per source, conversations per image,
    targets (`[SEG]` + `[REJ]`) per question, token lengths per family (min / mean / max over
    conversations) and truncated / dropped conversations per family (None when untokenized)."""
    tokenized = all(record["tokenized"] for record in records)
    lengths: dict[str, list[int]] = defaultdict(list)
    cut: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        family = family_of(record["source"])
        if tokenized:
            lengths[family] += record["token_lengths"]
            cut[family]["truncated"] += record["truncated_conversations"]
            cut[family]["dropped"] += record["dropped_conversations"]
    tokens = {
        family: {
            "conversations": len(values),
            "min": min(values),
            "mean": float(np.mean(values)),
            "max": max(values),
            "truncated": cut[family]["truncated"],
            "dropped": cut[family]["dropped"],
        }
        for family, values in sorted(lengths.items())
    }
    skipped = Counter()
    for record in records:
        skipped.update(record.get("skipped_records") or {})
    return {
        "num_samples": len(records),
        "samples_per_family": dict(Counter(family_of(r["source"]) for r in records)),
        "samples_per_source": dict(Counter(r["source"] for r in records)),
        "conversations_per_image": histogram(
            [len({e["conversation"] for e in r["conversations"]}) for r in records]
        ),
        "targets_per_question": histogram(
            [e["num_seg"] + e["num_rej"] for r in records for e in r["conversations"]]
        ),
        "token_lengths": tokens if tokenized else None,
        "truncated_conversations": sum(t["truncated"] for t in tokens.values())
        if tokenized
        else None,
        "dropped_conversations": sum(t["dropped"] for t in tokens.values()) if tokenized else None,
        "skipped_records": dict(skipped),
        "draws_may_differ": any(record["draws_may_differ"] for record in records),
    }


def table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if number == 0 else cell.rjust(width)
            for number, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def format_stats(stats: dict) -> str:
    """The stats as text tables."""
    total = stats["num_samples"]

    def shares(counts: dict[str, int], title: str) -> str:
        rows = [[title, "samples", "share"]]
        rows += [[name, str(n), f"{100 * n / total:.1f}%"] for name, n in sorted(counts.items())]
        return table(rows)

    def counts(values: dict[str, int], title: str, unit: str) -> str:
        return table([[title, unit]] + [[key, str(n)] for key, n in values.items()])

    parts = [
        shares(stats["samples_per_family"], "family"),
        shares(stats["samples_per_source"], "source"),
        counts(stats["conversations_per_image"], "conversations per image", "images"),
        counts(stats["targets_per_question"], "targets per question", "questions"),
    ]
    if stats["token_lengths"] is None:
        parts.append("token lengths: need --version (a model directory); skipped")
    else:
        columns = ("conversations", "min", "mean", "max", "truncated", "dropped")
        rows = [["tokens per conversation", *columns]]
        for family, values in stats["token_lengths"].items():
            cells = [f"{values[c]:.1f}" if c == "mean" else str(values[c]) for c in columns]
            rows.append([family, *cells])
        parts.append(table(rows))
    if stats["skipped_records"]:
        parts.append(f"bad records skipped: {stats['skipped_records']}")
    return "\n\n".join(parts)


def print_listing(records: Sequence[dict]) -> None:
    """Without an output flag: each item's source, image and rounds on stdout."""
    for record in records:
        print(f"#{record['index']} {record['source']} {record['image']}")
        for entry in record["conversations"]:
            question = entry["question"].replace("\n", "\\n")
            print(f"  [{entry['conversation']}.{entry['round']}] Q: {question}")
            print(f"        A: {entry['answer']}")


def write_outputs(
    options: argparse.Namespace,
    previews: list[tuple[int, Preview, dict | None]],
    records: list[dict],
) -> None:
    """--json, --stats and --vis (a listing on stdout when none is given)."""
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(records, indent=1))
    if options.stats:
        stats = compute_stats(records)
        print(format_stats(stats))
        if options.json:
            stats_file = options.json.with_name(options.json.stem + STATS_SUFFIX)
            stats_file.write_text(json.dumps(stats, indent=1))
    if options.vis:
        options.vis.mkdir(parents=True, exist_ok=True)
        for (index, preview, _), record in zip(previews, records, strict=True):
            render_preview(preview.sample, record).save(options.vis / VIS_NAME.format(index=index))
    if not (options.json or options.stats or options.vis):
        print_listing(records)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options, train_argv = parse_flags(argv)
    resolved = resolve_config(train_argv)
    config = resolved.config
    if config.print_config:
        print(json.dumps(resolved.to_json(), indent=2))
        return 0
    try:
        tokenization = load_tokenization(config)
    except (OSError, ValueError) as error:
        full_parser().error(f"--version {config.version}: {error}")
    # without the tokenizer, only its rejections could make training redraw (module docstring)
    may_differ = tokenization is None and (config.too_long == "drop" or config.skip_bad_samples)
    if tokenization is None:
        LOGGER.warning(
            "token statistics need --version (a model directory); %s is none, so they are "
            "skipped%s",
            config.version,
            "; draws may differ from training's where its tokenizer would redraw"
            if may_differ
            else "",
        )
    processor = training_processor(config, tokenization) if tokenization else None
    try:
        previews = draw_previews(config, processor, options)
    except DataError as error:
        LOGGER.error("%s", error)
        return DATA_ERROR
    records = [preview_record(i, p, s, may_differ) for i, p, s in previews]
    write_outputs(options, previews, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
