"""tools/show_samples.py on the tiny assets: its records are the samples an independent
composition (the recipe file read as YAML -> DataConfig -> `build_sources` + `HybridDataset`)
draws for the same (seed, epoch, index); with `--version` it tokenizes as the processor of a
built segmenter does (the same ids, lengths, cut conversations and redraws; HF, LLaVA-v1 and
LISA-family directories); its stats are the counts of its records; `--vis` colours exactly the
mask pixels; bad flags stop in one line with status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from model.backbone import image_token_count
from model.builder import ModelConfig, build_segmenter, load_backbone
from model.tiny import tiny_model_config, write_tiny_qwen2_5_vl
from tests.model.test_layouts import legacy_assets  # noqa: F401  (a session fixture)
from tools import show_samples
from utils.collate import SampleProcessor
from utils.config import resolve_config
from utils.datasets.base import SamplingOptions
from utils.datasets.mixer import DataConfig, HybridDataset, build_sources

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RECIPES = ("lisa", "gsva", "m2sa")
SEED, EPOCH, COUNT = 7, 1, 12
# a limit under the tiny VQA dialogues' lengths (about 100-150 tokens) and over the image tokens
SHORT_LIMIT = 90
DRAWN = 4  # items of the --too_long drop comparison


def recipe_samples(dataset_dir: Path, recipe: str, count: int = COUNT, process=None) -> list:
    """Items 0..count-1 of epoch EPOCH, composed from the recipe file without utils.config."""
    values = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    families = tuple(values["dataset"])

    def names(value) -> tuple[str, ...]:
        return tuple(value) if isinstance(value, list) else tuple(value.split("||"))

    option_names = {field.name for field in dataclasses.fields(SamplingOptions)}
    data = DataConfig(
        dataset_dir=dataset_dir,
        dataset=families,
        sample_rates=tuple(float(rate) for rate in values["sample_rates"]),
        family_data={family: names(values[f"{family}_data"]) for family in families},
        options=SamplingOptions(**{k: v for k, v in values.items() if k in option_names}),
        seed=SEED,
    )
    dataset = HybridDataset(build_sources(data), data.sample_rates, count, data.seed, process)
    dataset.set_epoch(EPOCH)
    return [dataset[index] for index in range(count)]


def run_tool(out: Path, *flags: str) -> tuple[list[dict], dict | None, str]:
    """(records, stats or None, stdout) of one in-process run writing out/samples.json."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = show_samples.main([*flags, f"--json={out / 'samples.json'}"])
    assert status == 0
    records = json.loads((out / "samples.json").read_text())
    stats_file = out / "samples.stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    return records, stats, stdout.getvalue()


def common_flags(assets: Path, recipe: str, count: int = COUNT) -> list[str]:
    return [
        f"--recipe={recipe}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--seed={SEED}",
        f"--epoch={EPOCH}",
        f"--num_samples={count}",
    ]


@pytest.fixture(scope="module", params=RECIPES)
def untokenized(request, assets, tmp_path_factory):
    """(recipe, records, stats, stdout, vis dir) of a run without a model directory."""
    out = tmp_path_factory.mktemp(f"show_{request.param}")
    flags = [*common_flags(assets, request.param), "--stats", f"--vis={out / 'vis'}"]
    return (request.param, *run_tool(out, *flags), out / "vis")


@pytest.fixture(scope="module")
def tiny_model(assets):
    return build_segmenter(tiny_model_config(assets))


@pytest.fixture(scope="module")
def tokenized(assets, tmp_path_factory):
    """(records, stats, stdout) of an m2sa run with the tiny LLaVA and a short length limit."""
    out = tmp_path_factory.mktemp("show_tokenized")
    flags = common_flags(assets, "m2sa") + [
        f"--version={assets / 'llava_tiny'}",
        f"--model_max_length={SHORT_LIMIT}",
        "--stats",
    ]
    return run_tool(out, *flags)


def test_records_are_the_samples_the_recipe_draws(untokenized, assets) -> None:
    recipe, records, _, _, _ = untokenized
    samples = recipe_samples(assets / "dataset", recipe)
    assert [record["index"] for record in records] == list(range(COUNT))
    assert any(record["num_masks"] for record in records)
    for record, sample in zip(records, samples, strict=True):
        assert (record["source"], record["image"]) == (sample.source, str(sample.image_path))
        assert record["image_size"] == list(sample.image.shape[:2])
        entries = record["conversations"]
        assert [(e["conversation"], e["round"]) for e in entries] == [
            (c, r) for c, rounds in enumerate(sample.conversations) for r in range(len(rounds))
        ]
        assert [(e["question"], e["answer"]) for e in entries] == [
            pair for rounds in sample.conversations for pair in rounds
        ]
        assert entries[0]["question"].startswith("<image>\n")
        for entry in entries:
            assert entry["num_seg"] == entry["answer"].count("[SEG]")
            assert entry["num_rej"] == entry["answer"].count("[REJ]")
        targets = sum(e["num_seg"] + e["num_rej"] for e in entries)
        assert record["num_masks"] == sample.masks.shape[0] == targets
        assert record["token_lengths"] is None and record["tokenized"] is False
        assert record["draws_may_differ"] is False  # --too_long truncate, no --skip_bad_samples


def expected_stats(records: list[dict]) -> dict:
    """The stats, counted from the records here."""
    lengths, cut = defaultdict(list), defaultdict(Counter)
    for record in records:
        family = record["source"].split("/")[0]
        if record["tokenized"]:
            lengths[family] += record["token_lengths"]
            cut[family].update(
                truncated=record["truncated_conversations"],
                dropped=record["dropped_conversations"],
            )
    conversations = [len({e["conversation"] for e in r["conversations"]}) for r in records]
    targets = [e["num_seg"] + e["num_rej"] for r in records for e in r["conversations"]]
    return {
        "samples_per_family": Counter(r["source"].split("/")[0] for r in records),
        "samples_per_source": Counter(r["source"] for r in records),
        "conversations_per_image": {str(k): v for k, v in Counter(conversations).items()},
        "targets_per_question": {str(k): v for k, v in Counter(targets).items()},
        "token_lengths": {
            family: (len(v), min(v), pytest.approx(np.mean(v)), max(v), *cut[family].values())
            for family, v in lengths.items()
        },
    }


def test_stats_are_the_counts_of_the_records(untokenized, tokenized) -> None:
    for records, stats, stdout in (untokenized[1:4], tokenized):
        expected = expected_stats(records)
        assert stats["num_samples"] == len(records)
        for key in ("samples_per_family", "samples_per_source"):
            assert stats[key] == dict(expected[key])
        assert stats["conversations_per_image"] == expected["conversations_per_image"]
        assert stats["targets_per_question"] == expected["targets_per_question"]
        for family, count in expected["samples_per_family"].items():
            share = f"{100 * count / len(records):.1f}%"
            assert any(line.split() == [family, str(count), share] for line in stdout.splitlines())
    _, stats, stdout = untokenized[1:4]
    assert stats["token_lengths"] is None and "need --version" in stdout
    records, stats, stdout = tokenized
    keys = ("conversations", "min", "mean", "max", "truncated", "dropped")
    got = {family: tuple(v[k] for k in keys) for family, v in stats["token_lengths"].items()}
    assert got == expected_stats(records)["token_lengths"]
    assert stats["truncated_conversations"] == sum(r["truncated_conversations"] for r in records)
    assert stats["truncated_conversations"] > 0 and stats["dropped_conversations"] == 0
    assert "tokens per conversation" in stdout


def test_tokenized_records_are_what_the_training_processor_makes(
    tokenized, tiny_model, assets
) -> None:
    model, tokenizer = tiny_model
    records = tokenized[0]
    version = assets / "llava_tiny"
    whole = SampleProcessor.for_model(model, tokenizer, str(version), "llava_v1", None)
    limited = SampleProcessor.for_model(model, tokenizer, str(version), "llava_v1", SHORT_LIMIT)
    # truncation never rejects, so the draws are the untokenized composition's
    samples = recipe_samples(assets / "dataset", "m2sa")
    for record, sample in zip(records, samples, strict=True):
        assert [(e["question"], e["answer"]) for e in record["conversations"]] == [
            pair for rounds in sample.conversations for pair in rounds
        ]
        lengths = [len(ids) for ids in whole(sample).input_ids]
        assert record["token_lengths"] == lengths
        assert record["truncated_conversations"] == limited(sample).truncated_conversations
        assert record["truncated_conversations"] == sum(n > SHORT_LIMIT for n in lengths)
        assert record["tokenized"] is True and record["dropped_conversations"] == 0


def test_dropping_redraws_as_training_does(assets, tiny_model, tmp_path) -> None:
    model, tokenizer = tiny_model
    flags = common_flags(assets, "lisa", DRAWN) + [
        f"--version={assets / 'llava_tiny'}",
        f"--model_max_length={SHORT_LIMIT}",
        "--too_long=drop",
    ]
    records, _, _ = run_tool(tmp_path, *flags)
    processor = SampleProcessor.for_model(
        model, tokenizer, str(assets / "llava_tiny"), "llava_v1", SHORT_LIMIT, too_long="drop"
    )
    processed = recipe_samples(assets / "dataset", "lisa", DRAWN, process=processor)
    plain = recipe_samples(assets / "dataset", "lisa", DRAWN)
    assert [r["image"] for r in records] == [item.image_path for item in processed]
    assert [r["dropped_conversations"] for r in records] == [
        item.dropped_conversations for item in processed
    ]
    # the tiny VQA dialogues are all too long, so training (and the tool) drew other samples
    assert [r["image"] for r in records] != [sample.image_path for sample in plain]
    untokenized, _, _ = run_tool(tmp_path, *common_flags(assets, "lisa", 1), "--too_long=drop")
    assert untokenized[0]["draws_may_differ"] is True


def test_vis_colours_exactly_the_mask_pixels(untokenized, assets) -> None:
    recipe, records, _, _, vis = untokenized
    samples = recipe_samples(assets / "dataset", recipe)
    assert sorted(path.name for path in vis.iterdir()) == [
        f"sample_{index:05d}.png" for index in range(COUNT)
    ]
    for record, sample in zip(records, samples, strict=True):
        png = np.asarray(Image.open(vis / f"sample_{record['index']:05d}.png").convert("RGB"))
        height, width = sample.image.shape[:2]
        scale = png.shape[1] // width
        assert png.shape[1] == width * scale and png.shape[0] > height * scale  # text below
        shown = png[: height * scale : scale, ::scale]
        inside = (sample.masks == 1).any(axis=0)
        untouched = ~inside & ~(sample.masks == 255).any(axis=0)
        assert (shown[untouched] == sample.image[untouched]).all()
        if inside.any():
            changed = (shown[inside] != sample.image[inside]).any(axis=-1)
            assert changed.mean() > 0.9


@pytest.mark.parametrize(
    "flags",
    [
        ["--recipe=nope"],
        ["--num_samples=0"],
        ["--too_long=cut"],
        ["--bogus"],
        ["--dataset=sem_seg||nope", "--sample_rates=1,1"],
    ],
)
def test_bad_flags_stop_in_one_line_with_status_2(flags, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        show_samples.main(flags)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "error:" in error


def test_unknown_recipe_exits_2_from_the_command_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/show_samples.py", "--recipe=nope", f"--json={tmp_path / 'x'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "show_samples.py: error: --recipe 'nope': unknown recipe; shipped recipes: "
        "cores, gsva, lasagna, lisa, m2sa, qwen2_5_vl (or give the path of a .yaml recipe file)"
    ]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("layout", ["hf", "llava_v1", "lisa"])
def test_tokenization_without_the_model_is_the_builders(layout, assets, legacy_assets) -> None:  # noqa: F811
    versions = {
        "hf": assets / "llava_tiny",
        "llava_v1": legacy_assets.llava_v1.directory,
        "lisa": legacy_assets.lisa.directory,
    }
    version, tower = str(versions[layout]), str(legacy_assets.clip)
    config = resolve_config([f"--version={version}", f"--vision-tower={tower}"]).config
    mine = show_samples.load_tokenization(config)
    built = load_backbone(
        ModelConfig(version=version, vision_pretrained="", vision_tower=tower, precision="fp32")
    )
    assert mine.token_ids == built.token_ids
    assert mine.image_tokens == image_token_count(built.llava.config)
    text = "<s> USER: <im_start><image><im_end>\n Is it [SEG] or [REJ]? ASSISTANT: [SEG].</s>"
    assert mine.tokenizer(text).input_ids == built.tokenizer(text).input_ids


def test_a_qwen_directory_is_tokenized_as_its_training_run(assets, tmp_path) -> None:
    """With a Qwen2.5-VL `--version`, the records' token lengths are the training processor's
    (each image's own image-token count within the run's --max_pixels)."""
    version = write_tiny_qwen2_5_vl(tmp_path / "qwen2_5_vl_tiny")
    budget = "--max_pixels=6272"
    flags = common_flags(assets, "qwen2_5_vl") + [f"--version={version}", budget]
    records = run_tool(tmp_path, *flags)[0]
    sam = str(assets / "vision_pretrained" / "sam_tiny.pth")
    config = tiny_model_config(tmp_path, "qwen2_5_vl", vision_pretrained=sam)
    model, tokenizer = build_segmenter(config)
    processor = SampleProcessor.for_model(
        model, tokenizer, str(version), "qwen2_vl", pixel_budget=(None, 6272)
    )
    samples = recipe_samples(assets / "dataset", "qwen2_5_vl")
    for record, sample in zip(records, samples, strict=True):
        assert record["token_lengths"] == [len(ids) for ids in processor(sample).input_ids]
