"""The lasagna_sem_seg training family (utils/datasets/lasagna_sem_seg.py) on the tiny assets in
their real layouts: each drawn sample names exactly the classes `get_sample_classes` draws, its
answer and question equal a composition written here from LaSagnA's strings (congvvc/LaSagnA
@897cbbe utils/utils.py, utils/sem_seg_dataset.py), its mask rows equal the union of each
present class's pixels computed here from the label PNGs (absent classes: all-zero rows); draws
are a function of (seed, epoch, index); `--num_all_classes` reaches the family; the whole
`--recipe lasagna` mix draws and `tools/show_samples.py --recipe lasagna` runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.utils import test_recipe_draws as draws
from tools import show_samples
from tools.make_tiny_assets import make_tiny_assets
from tools.tiny_assets.common import AssetOptions, Context
from tools.tiny_assets.lasagna_train import write_lasagna_train
from utils.config import parse_args
from utils.datasets.base import IGNORE_LABEL, DataError, SamplingOptions, UnusableSample
from utils.datasets.lasagna import get_sample_classes, question_classes
from utils.datasets.lasagna_sem_seg import LasagnaSemSegSource, build_lasagna_sem_seg_sources
from utils.datasets.mixer import DataConfig, HybridDataset, build_sources

CLASS_LISTS = Path(__file__).resolve().parents[2] / "utils" / "datasets" / "class_lists"
DATASETS = ("cocostuff", "ade20k", "mapillary", "cityscapes")
# LaSagnA sem_seg_dataset.py: sample_rate [6, 3, 2, 2, 1] over cocostuff||ade20k||mapillary||
# cityscapes||openimage; LaSagnA test_sem.py K per set
WEIGHTS = {"cocostuff": 6.0, "ade20k": 3.0, "mapillary": 2.0, "cityscapes": 2.0}
CLASS_COUNTS = {"cocostuff": 171, "ade20k": 150, "mapillary": 65, "cityscapes": 19}
NUM_ALL_CLASSES = 80
INSTRUCTIONS = [  # LaSagnA utils/utils.py SEG_INPUT_LIST's sentences, in order
    "Segment this image.",
    "Please segment this image.",
    "Can you segment this image?",
    "What are in this image? Please respond with segmentation mask.",
    "What are in this image? Please output segmentation mask.",
    "What are in this image? Please give segmentation result.",
    "What are in this image? Please visualize segmentation mask.",
    "What are in this image? Please respond with segmentation result.",
    "What are in this image? Please output segmentation result.",
    "Segment all the objects in this image.",
    "Please segment all the objects in this image.",
    "Can you segment all the objects in this image?",
    "What are in this image? Please respond with segmentation mask of all the objects.",
    "What are in this image? Please output segmentation mask of all the objects.",
    "What are in this image? Please give segmentation result of all the objects.",
    "What are in this image? Please visualize segmentation mask of all the objects.",
    "What are in this image? Please respond with segmentation result of all the objects.",
    "What are in this image? Please output segmentation result of all the objects.",
]
SEMANTIC_ANSWER = re.compile(r"(?:[^\[\]<>]+\[(?:SEG|REJ)\])+")
SEMANTIC_QUESTION = re.compile(r"<image>\n<semantic>.+<cat_start> .+ <cat_end>", re.DOTALL)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's tiny assets plus LaSagnA's extra training layouts."""
    root = make_tiny_assets(tmp_path_factory.mktemp("lasagna_assets"), seed=0, models=False)
    write_lasagna_train(Context(root / "dataset", AssetOptions(), 0))
    return root / "dataset"


def strip_suffixes(name: str) -> str:
    """LaSagnA init_coco_sem's spelling of a COCO-Stuff name."""
    return name.lower().replace("-merged", "").replace("-other", "").replace("-stuff", "")


def oracle_vocabulary(dataset_dir: Path, dataset: str) -> tuple[list[str], dict[int, int]]:
    """(class names, {stored value: class index}) read here from the files themselves."""
    if dataset == "ade20k":
        names = json.loads((CLASS_LISTS / "ade20k_classes.json").read_text())
        return names, {index + 1: index for index in range(len(names))}
    if dataset == "cocostuff":
        names = json.loads((CLASS_LISTS / "cocostuff171_classes.json").read_text())["names"]
        lines = (CLASS_LISTS / "cocostuff_classes.txt").read_text().splitlines()[1:]
        stored = [line.split(": ", 1)[1] for line in lines]
        # the used values in order are the 171 names; an unused thing's name may reappear
        # stripped ("mirror-stuff"), so match in order
        values, position = {}, 0
        for value, name in enumerate(stored):
            if position < len(names) and strip_suffixes(name) == names[position]:
                values[value] = position
                position += 1
        assert position == len(names)
        return names, values
    if dataset == "mapillary":
        labels = json.loads((dataset_dir / "mapillary" / "config_v1.2.json").read_text())["labels"]
        names = [label["readable"].lower() for label in labels[:65]]
        return names, {index: index for index in range(65)}
    panoptic = dataset_dir / "cityscapes" / "gtFine" / "cityscapes_panoptic_val.json"
    categories = json.loads(panoptic.read_text())["categories"]
    names = [category["name"].lower() for category in categories]
    return names, {category["id"]: index for index, category in enumerate(categories)}


def oracle_index_map(path: Path, values: dict[int, int]) -> np.ndarray:
    """int [H, W]: the class index of each pixel, -1 where no class (PIL reads palette PNGs by
    index)."""
    raw = np.array(Image.open(path)).astype(np.int64)
    lookup = np.full(max(int(raw.max()), max(values)) + 1, -1)
    for value, index in values.items():
        lookup[value] = index
    return lookup[raw]


def sources(dataset_dir: Path, **options: object) -> dict[str, LasagnaSemSegSource]:
    built = build_lasagna_sem_seg_sources(dataset_dir, list(DATASETS), SamplingOptions(**options))
    return {source.dataset: source for source in built}


def test_sources_their_weights_vocabularies_and_records(dataset_dir: Path) -> None:
    built = sources(dataset_dir)
    assert list(built) == list(DATASETS)
    for name, source in built.items():
        assert source.name == f"lasagna_sem_seg/{name}" and source.weight == WEIGHTS[name]
        assert source.classes == oracle_vocabulary(dataset_dir, name)[0]
        assert len(source.classes) == CLASS_COUNTS[name]
        assert len(source) == AssetOptions().images_per_split
        assert list(source.check(deep=True)) == []


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize(("index", "seed"), [(0, 0), (3, 11), (7, 5)])
def test_a_drawn_sample_is_the_independent_composition(
    dataset_dir: Path, dataset: str, index: int, seed: int
) -> None:
    source = sources(dataset_dir)[dataset]
    sample = source.sample_at(index, np.random.default_rng(seed))
    names, values = oracle_vocabulary(dataset_dir, dataset)
    classes = oracle_index_map(source.paths(index)[1], values)
    positives = [names[c] for c in sorted(set(classes[classes >= 0].tolist()))]
    # the same generator, replayed: the draw, then the question list, then the template
    rng = np.random.default_rng(seed)
    draw = get_sample_classes(names, positives, NUM_ALL_CLASSES, rng)
    asked = question_classes(dataset, names, draw, rng)
    template = int(rng.integers(len(INSTRUCTIONS)))
    assert set(draw.positives) == set(positives)
    assert len(draw.classes) == min(NUM_ALL_CLASSES, len(names))
    [[(question, answer)]] = sample.conversations
    assert question == (
        f"<image>\n<semantic>{INSTRUCTIONS[template]}<cat_start> "
        f"{', '.join(asked).lower()} <cat_end>"
    )
    assert sorted(asked) == sorted(names)  # closed-set: the whole vocabulary, shuffled
    assert answer == "".join(
        name.lower() + ("[SEG]" if name in positives else "[REJ]") for name in draw.classes
    )
    assert sample.masks.shape == (len(draw.classes), *classes.shape)
    for name, mask in zip(draw.classes, sample.masks, strict=True):
        expected = classes == names.index(name) if name in positives else np.zeros_like(mask)
        np.testing.assert_array_equal(mask, expected.astype(np.uint8), err_msg=name)
    assert sample.source == f"lasagna_sem_seg/{dataset}"
    assert sample.image.shape[:2] == classes.shape


def test_excluded_ignore_pixels_are_255_in_present_masks_only(dataset_dir: Path) -> None:
    source = sources(dataset_dir, ignore_pixels="exclude")["cocostuff"]
    sample = source.sample_at(0, np.random.default_rng(1))
    answer = sample.conversations[0][0][1]
    present = [marker == "[SEG]" for marker in re.findall(r"\[SEG\]|\[REJ\]", answer)]
    frame = np.array(Image.open(source.paths(0)[1])) == IGNORE_LABEL
    assert frame.any()
    for is_present, mask in zip(present, sample.masks, strict=True):
        if is_present:
            assert (mask[frame] == IGNORE_LABEL).all() and (mask[~frame] <= 1).all()
        else:
            assert not mask.any()


def family_mix(dataset_dir: Path, seed: int, num_all_classes: int = NUM_ALL_CLASSES):
    config = DataConfig(
        dataset_dir=dataset_dir,
        dataset=("lasagna_sem_seg",),
        sample_rates=(1.0,),
        family_data={"lasagna_sem_seg": DATASETS},
        seed=seed,
        num_all_classes=num_all_classes,
    )
    return HybridDataset(build_sources(config), config.sample_rates, 6, config.seed)


def same(a, b) -> bool:
    return a.conversations == b.conversations and np.array_equal(a.masks, b.masks)


def test_draws_are_a_function_of_seed_epoch_and_index(dataset_dir: Path) -> None:
    first, second = family_mix(dataset_dir, 3), family_mix(dataset_dir, 3)
    forward = [first[index] for index in range(6)]
    backward = [second[index] for index in reversed(range(6))][::-1]
    assert all(same(a, b) for a, b in zip(forward, backward, strict=True))
    second.set_epoch(1)
    assert not all(same(a, second[i]) for i, a in enumerate(forward))
    other_seed = family_mix(dataset_dir, 4)
    assert not all(same(a, other_seed[i]) for i, a in enumerate(forward))


def test_num_all_classes_flows_from_the_flag_to_every_source(dataset_dir: Path) -> None:
    config = parse_args(
        ["--recipe=lasagna", f"--dataset_dir={dataset_dir}", "--num_all_classes=30"]
    )
    assert config.num_all_classes == 30 and config.data_config().num_all_classes == 30
    families = dict(build_sources(config.data_config()))
    built = families["lasagna_sem_seg"]
    assert [source.num_all_classes for source in built] == [30] * len(DATASETS)
    sample = built[DATASETS.index("ade20k")].sample_at(0, np.random.default_rng(0))
    assert len(re.findall(r"\[SEG\]|\[REJ\]", sample.conversations[0][0][1])) == 30
    assert len(sample.masks) == 30
    assert parse_args(["--recipe=lasagna"]).num_all_classes == NUM_ALL_CLASSES


def test_num_all_classes_below_one_stops_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_args(["--recipe=lasagna", "--num_all_classes=0"])
    assert stop.value.code == 2
    assert "--num_all_classes must be at least 1, got 0" in capsys.readouterr().err


def write_ade20k_record(root: Path, label: np.ndarray) -> None:
    Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(
        root / "ade20k" / "images" / "training" / "ADE_train_00000001.jpg"
    )
    Image.fromarray(label).save(
        root / "ade20k" / "annotations" / "training" / "ADE_train_00000001.png"
    )


def one_ade20k_source(tmp_path: Path, label: np.ndarray) -> LasagnaSemSegSource:
    for folder in ("images", "annotations"):
        (tmp_path / "ade20k" / folder / "training").mkdir(parents=True)
    write_ade20k_record(tmp_path, label)
    return LasagnaSemSegSource(tmp_path, SamplingOptions(), "ade20k")


def test_a_map_without_labelled_pixels_is_redrawn(tmp_path: Path) -> None:
    source = one_ade20k_source(tmp_path, np.zeros((4, 6), np.uint8))
    with pytest.raises(UnusableSample, match="has no labelled pixel"):
        source.sample_at(0, np.random.default_rng(0))


def test_a_value_of_no_class_is_one_error_naming_file_and_value(tmp_path: Path) -> None:
    source = one_ade20k_source(tmp_path, np.full((4, 6), 151, np.uint8))
    with pytest.raises(DataError, match=r"ADE_train_00000001\.png.*label value 151"):
        source.sample_at(0, np.random.default_rng(0))
    assert len(list(source.check(deep=True))) == 1


def test_openimage_and_unknown_names_are_refused(dataset_dir: Path) -> None:
    with pytest.raises(ValueError, match="'openimage': OpenImage V6 is not read"):
        build_lasagna_sem_seg_sources(dataset_dir, ["openimage"], SamplingOptions())
    with pytest.raises(ValueError, match="'pascal_part': unknown; known: cocostuff, ade20k"):
        build_lasagna_sem_seg_sources(dataset_dir, ["pascal_part"], SamplingOptions())


def test_the_recipe_mix_draws_every_family_and_lasagnas_sequences(dataset_dir: Path) -> None:
    config = parse_args(["--recipe=lasagna", f"--dataset_dir={dataset_dir}", "--seed=1"])
    data = config.data_config()
    mix = HybridDataset(build_sources(data), data.sample_rates, 60, data.seed)
    samples = [mix[index] for index in range(60)]
    assert {sample.source.split("/")[0] for sample in samples} == set(config.datasets)
    for sample in samples:
        family = sample.source.split("/")[0]
        for conversation in sample.conversations:
            question, answer = conversation[0]
            where = (sample.source, question, answer)
            if family == "lasagna_sem_seg":
                assert SEMANTIC_QUESTION.fullmatch(question), where
                assert SEMANTIC_ANSWER.fullmatch(answer), where
                assert len(sample.masks) == answer.count("[SEG]") + answer.count("[REJ]")
            elif family == "refer_seg":  # LISA's templates (see configs/lasagna.yaml)
                assert re.fullmatch(draws.SEG_QUESTIONS["lisa"], question, re.DOTALL), where
                assert re.fullmatch(draws.SEG_ANSWERS["lisa"], answer, re.DOTALL), where
            elif family == "reason_seg":
                expected = draws.reason_seg_question("lisa", answer)
                assert re.fullmatch(expected, question, re.DOTALL), where


@pytest.mark.parametrize("tokenized", [False, True])
def test_show_samples_runs_the_lasagna_recipe(
    dataset_dir: Path, tiny_dir: Path, tmp_path: Path, tokenized: bool
) -> None:
    """With the tiny LLaVA the samples are tokenized in the lasagna vocabulary, as training."""
    out = tmp_path / "samples.json"
    flags = ["--recipe=lasagna", f"--dataset_dir={dataset_dir}", "--num_samples=8"]
    if tokenized:
        flags.append(f"--version={tiny_dir / 'llava_tiny'}")
    with contextlib.redirect_stdout(io.StringIO()):
        assert show_samples.main([*flags, f"--json={out}", "--stats"]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 8
    semantic = [r for r in records if r["source"].startswith("lasagna_sem_seg/")]
    assert semantic
    for record in semantic:
        [round_] = record["conversations"]
        assert round_["num_seg"] + round_["num_rej"] == record["num_masks"]
        assert record["tokenized"] == tokenized
        assert (record["token_lengths"] is not None) == tokenized
