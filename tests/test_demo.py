"""`make demo`'s pieces: the baselines on a hand-made image, the model's scores from evaluation
records, the criterion, summary.json's layout, the training-curve PNG, the gRefCOCO reader the
baselines use; and (slow tier) a shortened demo whose model clearly learns."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from tools import demo, demo_report
from tools.make_tiny_assets import make_tiny_assets
from utils.config import resolve_config

SIDE = 8
# the shortened demo (800 steps; measured +0.25 over 0.08) must gain this much gIoU on present
# targets, and its losses must fall below these fractions of their first values (means over
# LOSS_WINDOW steps)
LEARNED_GIOU = 0.15
LOSS_WINDOW = 50
LOSS_DROP = {"train/ce_loss": 0.5, "train/mask_dice_loss": 0.9}
TEST_PORT = demo.MASTER_PORT + 2  # apart from a `make demo` running beside the test


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_baselines_on_a_hand_made_image() -> None:
    left, right = box(0, 0, 2, 2), box(4, 4, 8, 8)  # 4 and 16 pixels
    targets = [left, left | right, None, None]
    scores = demo_report.referring_baselines([(targets, [left, right])])
    # all shapes: 4/20 for the left one, 1 for both; random shape: (1 + 0)/2 and (4/20 + 16/20)/2
    assert scores["all_shapes"] == pytest.approx((4 / 20 + 1.0) / 2)
    assert scores["random_shape"] == pytest.approx((0.5 + 0.5) / 2)
    assert scores["always_seg"] == pytest.approx(0.5)


def test_record_scores_use_present_targets_for_giou_and_all_for_accuracy() -> None:
    records = [
        {"intersection": 3, "union": 4, "empty_gt": False, "predicted_present": True},
        {"intersection": 0, "union": 5, "empty_gt": False, "predicted_present": False},
        {"intersection": 0, "union": 0, "empty_gt": True, "predicted_present": False},
        {"intersection": 0, "union": 7, "empty_gt": True, "predicted_present": True},
    ]
    scores = demo_report.record_scores(records)
    assert scores[demo_report.PRESENT_GIOU] == pytest.approx(0.375)
    assert scores[demo_report.ACCURACY] == pytest.approx(0.5)


def fake_summary(trained_giou: float, trained_accuracy: float) -> dict:
    referring = demo.REFERRING_SET
    untrained = {referring: {"giou": 0.2, "present_giou": 0.1, "decision_accuracy": 0.7}}
    trained = {
        referring: {
            "giou": 0.6,
            "present_giou": trained_giou,
            "decision_accuracy": trained_accuracy,
        }
    }
    baselines = {
        referring: {"untrained": 0.1, "all_shapes": 0.4, "random_shape": 0.3, "always_seg": 0.7}
    }
    return demo_report.build_summary(untrained, trained, baselines, referring, {"seconds": 1.0})


def test_summary_layout_and_criterion() -> None:
    summary = fake_summary(0.55, 0.85)
    assert set(summary) >= {"untrained", "trained", "baselines", "criterion"}
    referring = demo.REFERRING_SET
    assert set(summary["baselines"][referring]) == {
        "untrained",
        "all_shapes",
        "random_shape",
        "always_seg",
    }
    margins = summary["criterion"]["margins"]
    assert margins["all_shapes"] == pytest.approx(0.15)
    assert margins["always_seg"] == pytest.approx(0.15)
    assert summary["criterion"]["met"]
    assert not fake_summary(0.49, 0.85)["criterion"]["met"]  # 0.09 over all shapes
    assert not fake_summary(0.55, 0.79)["criterion"]["met"]  # 0.09 over always [SEG]
    json.dumps(summary)  # summary.json is plain JSON
    table = demo_report.format_baselines(summary, referring)
    assert "all_shapes" in table and "+15.00" in table and "criterion" in table
    assert "untrained" in demo_report.format_results(summary)


def test_training_curve_png(tmp_path) -> None:
    loss = [(step, 5.0 / (1 + step)) for step in range(1, 200)]
    validation = [(50, 0.2), (100, 0.35), (199, 0.5)]
    path = demo_report.write_curve(tmp_path / "curve.png", loss, validation)
    image = cv2.imread(str(path))
    width, height = demo_report.PANEL_SIZE
    assert image.shape == (height, 2 * width, 3)
    # both curves are drawn in their own colours
    assert (image == demo_report.LOSS_COLOUR).all(axis=2).any()
    assert (image == demo_report.VAL_COLOUR).all(axis=2).any()
    demo_report.write_curve(tmp_path / "empty.png", [], [(3, 0.1)])  # a single point draws too


def test_grefcoco_reader_gives_every_validation_target(tmp_path) -> None:
    from utils.datasets.validation import GReferValidation, parse_val_datasets

    root = make_tiny_assets(tmp_path, seed=0, families=["refer_seg", "grefcoco"], models=False)
    images = list(demo_report.grefcoco_images(root / "dataset", "val"))
    validation = GReferValidation(root / "dataset", parse_val_datasets(demo.REFERRING_SET)[0])
    assert len(images) == len(validation)
    for (targets, shapes), index in zip(images, range(len(validation)), strict=True):
        sample = validation[index]
        assert len(targets) == len(sample.masks)
        for target, mask in zip(targets, sample.masks, strict=True):
            assert np.array_equal(np.zeros_like(mask) if target is None else target, mask)
        assert all(shape.any() for shape in shapes)
        # one shape per object: crowd annotations (several objects of a class) are left out
        assert np.sum([shape > 0 for shape in shapes], axis=0).max() == 1
    scores = demo_report.referring_baselines(images)
    assert 0 < scores["random_shape"] < scores["all_shapes"] < 1
    assert 0.5 < scores["always_seg"] < 1


def test_absent_refs_add_no_target_refs(tmp_path) -> None:
    one = make_tiny_assets(tmp_path / "one", families=["grefcoco"], models=False)
    three = make_tiny_assets(tmp_path / "three", families=["grefcoco"], models=False, absent_refs=3)

    def absent_share(root) -> float:
        refs = json.loads((root / "dataset/refer_seg/grefcoco/grefs(unc).json").read_text())
        return sum(ref["no_target"] for ref in refs) / len(refs)

    assert absent_share(three) > 2 * absent_share(one)


def test_profiles_fit_their_budgets_and_commands_use_the_launcher() -> None:
    args = demo.parse_args(["--steps_per_epoch", "10", "--out", "/tmp/x"])
    profile = demo.profile_from(args)
    assert profile.steps_per_epoch == 10 and str(profile.out) == "/tmp/x"
    assert demo.profile_from(demo.parse_args(["--long"])).out.name == "demo-long"
    command = demo.train_command(profile)
    assert command[1:3] == ["--num_gpus", "2"] and "train_ds.py" in command
    assert "--eval_only" in demo.eval_command(profile, "untrained")


def test_the_demos_train_ds_commands_resolve_to_its_settings() -> None:
    """Every train_ds.py command the demo runs parses, over the default recipe, to the settings
    the demo was tuned with (LISA's architecture, mean new rows, GSVA-style answers)."""
    profile = demo.profile_from(demo.parse_args([]))
    train, evaluate = (
        resolve_config(command[command.index("train_ds.py") + 1 :]).config
        for command in (demo.train_command(profile), demo.eval_command(profile, "untrained"))
    )
    for config in (train, evaluate):
        assert not config.early_fusion and config.new_token_rows == "mean"
    assert train.prompt_style == "gsva" and train.ignore_pixels == "exclude"
    assert train.part_targets == "category" and evaluate.eval_only
    # the decision's data: gRefCOCO's lists of 1 to 20 expressions, most of the mix
    assert train.refer_seg_data == "grefcoco" and train.num_classes_per_sample == 20
    assert train.refer_draw == "varied" and evaluate.refer_draw == "reference"
    assert train.gsva_answer_form == "colon"
    assert dict(zip(train.datasets, train.rates, strict=True))["refer_seg"] == 12
    assert train.packing and not evaluate.packing


@pytest.mark.slow
def test_shortened_demo_learns(tmp_path) -> None:
    """The whole cycle with a short training: the model must clearly beat its untrained self on
    referring (present targets) and its loss must fall."""
    out = tmp_path / "demo"
    flags = ["--epochs", "2", "--steps_per_epoch", "400", "--master_port", str(TEST_PORT)]
    summary = demo.main(["--out", str(out), *flags, "--quiet"])
    referring = demo.REFERRING_SET
    trained = summary["trained"][referring][demo_report.PRESENT_GIOU]
    untrained = summary["untrained"][referring][demo_report.PRESENT_GIOU]
    assert trained > untrained + LEARNED_GIOU, (trained, untrained)
    for name, metrics in summary["trained"].items():  # MMR val and ReasonSeg val learn too
        assert metrics["giou"] > summary["untrained"][name]["giou"], name
    for tag in LOSS_DROP:
        values = [value for _, value in demo_report.loss_curve(out / "train", tag)]
        assert np.mean(values[-LOSS_WINDOW:]) < LOSS_DROP[tag] * np.mean(values[:LOSS_WINDOW]), tag
    assert (out / "training_curve.png").is_file() and (out / "summary.json").is_file()
    # the chat drew its masks (on its pair or on the probe's pairs, whichever got a [SEG])
    assert list((out / "chat").glob("**/output/*_overlay_*.png"))


def test_the_demos_start_from_the_shipped_base_models() -> None:
    for args in ([], ["--long"]):
        profile = demo.profile_from(demo.parse_args(args))
        version, sam = demo.model_paths(profile)
        assert version == demo.BASE_MODELS / "llava_tiny"
        assert sam == demo.BASE_MODELS / demo.BASE_SAM
        assert "--no-models" in demo.asset_command(profile)
        train = demo.train_command(profile)
        assert f"--version={version}" in train and f"--vision_pretrained={sam}" in train
        assert f"--version={version}" in demo.eval_command(profile, "untrained")
    demo.check_base_models(demo.BASE_MODELS)  # the committed files are the manifest's


def test_the_shipped_base_models_have_the_demo_presets_sizes() -> None:
    """demo_assets/ is what `make demo-assets` writes with the current preset: a change to
    `MODEL_PRESETS["demo"]` without rewriting the shipped models fails here."""
    from model.tiny import MODEL_PRESETS

    preset = MODEL_PRESETS["demo"]
    config = json.loads((demo.BASE_MODELS / "llava_tiny" / "config.json").read_text())
    for section, sizes in (("vision_config", preset.vision), ("text_config", preset.text)):
        shipped = {name: config[section][name] for name in sizes}
        assert shipped == sizes, section


def test_another_backbone_and_mask_model_are_written_with_the_assets(tmp_path) -> None:
    """`--backbone qwen2_5_vl --segmenter sam2`: the tiny random models come from
    make_tiny_assets with the dataset, the commands point at them with their prompt width, and
    the recipe's template gives way to the family's (no --conv_type needed)."""
    args = ["--backbone", "qwen2_5_vl", "--segmenter", "sam2", "--out", str(tmp_path)]
    profile = demo.profile_from(demo.parse_args(args))
    assert not profile.from_base_models
    assets = demo.asset_command(profile)
    assert "--no-models" not in assets
    assert "--backbone=qwen2_5_vl" in assets and "--segmenter=sam2" in assets
    version, sam = demo.model_paths(profile)
    assert version == tmp_path / "assets" / "qwen2_5_vl_tiny"
    assert sam == tmp_path / "assets" / "vision_pretrained" / "sam2_tiny.pt"
    train = demo.train_command(profile)
    config = resolve_config(train[train.index("train_ds.py") + 1 :]).config
    assert config.version == str(version) and config.vision_pretrained == str(sam)
    assert config.out_dim == 32 and not config.new_token_init and not config.early_fusion


@pytest.mark.slow
def test_shortened_demo_runs_on_qwen2_5_vl_and_sam2(tmp_path) -> None:
    """The whole cycle (untrained and trained evaluation, training through the launcher, merge,
    chat) on the tiny random Qwen2.5-VL + SAM 2, a few steps: it runs and reports."""
    out = tmp_path / "demo"
    flags = ["--epochs", "1", "--steps_per_epoch", "4", "--images_per_split", "6"]
    flags += ["--backbone", "qwen2_5_vl", "--segmenter", "sam2"]
    summary = demo.main(["--out", str(out), *flags, "--master_port", str(TEST_PORT), "--quiet"])
    assert summary["models"] == {"backbone": "qwen2_5_vl", "segmenter": "sam2"}
    assert summary["base_models"] is None and summary["steps"] == 4
    assert len(summary["trained"]) == len(demo.VAL_SETS)
    assert demo.REFERRING_SET in summary["trained"]
    assert summary["chat"]["present"]["answer"] and summary["chat"]["absent"]["answer"]
    assert summary["chat"]["probe"]["pairs"] == demo.CHAT_PROBE_PAIRS
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["model_type"] == "qwen2_5_vl"


def test_base_models_are_written_with_a_manifest_that_catches_a_changed_file(
    tmp_path, monkeypatch
) -> None:
    """`make demo-assets` without its pretraining steps (the command is the same otherwise):
    LLaVA in its directory, SAM as safetensors equal to the .pth make_tiny_assets wrote, every
    file's SHA-256 in the manifest; a changed byte is named."""
    from model.tensor_files import read_tensor_file
    from tools.make_tiny_assets import make_tiny_assets

    monkeypatch.setattr(demo, "BASE_PRETRAINING", ("--model_preset=demo",))
    manifest = demo.write_base_models(demo.Runner(quiet=True), tmp_path / "base")
    assert "llava_tiny/model.safetensors" in manifest["sha256"]
    assert str(demo.BASE_SAM) in manifest["sha256"] and "OUT" in manifest["command"]
    demo.check_base_models(tmp_path / "base")
    reference = make_tiny_assets(
        tmp_path / "reference",
        seed=demo.BASE_SEED,
        image_size=(64, 64),
        families=[],
        model_preset="demo",
    )
    ours = read_tensor_file(tmp_path / "base" / demo.BASE_SAM)
    theirs = read_tensor_file(reference / "vision_pretrained" / "sam_tiny.pth")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    config = tmp_path / "base" / "llava_tiny" / "config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(SystemExit, match="config.json: missing or not the file"):
        demo.check_base_models(tmp_path / "base")
    with pytest.raises(SystemExit, match="make demo-assets"):
        demo.check_base_models(tmp_path / "nothing")


def test_chat_results_score_the_present_mask_and_the_absent_rejection(tmp_path) -> None:
    truth = np.zeros((SIDE, SIDE), np.uint8)
    truth[:4, :4] = demo.MASK_ON  # 16 pixels
    predicted = np.zeros_like(truth)
    predicted[:4, :2] = demo.MASK_ON  # 8 of them
    cv2.imwrite(str(tmp_path / demo.CHAT_TRUTH), truth)
    cv2.imwrite(str(tmp_path / "mask.png"), predicted)
    present = {"prompt": "q", "text": "Sure, red circle:[SEG].", "targets": []}
    present["targets"] = [{"index": 0, "present": True, "mask": str(tmp_path / "mask.png")}]
    absent = {"prompt": "q", "text": "Sure, red circle:[REJ].", "targets": []}
    absent["targets"] = [{"index": 0, "present": False}]
    lines = [json.dumps(record) for record in (present, absent)]
    (tmp_path / demo.CHAT_ANSWERS).write_text("\n".join(lines) + "\n")
    (tmp_path / demo.PROBE_DIR).mkdir()
    (tmp_path / demo.PROBE_DIR / demo.CHAT_ANSWERS).write_text("\n".join(lines) + "\n")
    chat = demo.chat_results(tmp_path)
    assert chat["probe"] == {"pairs": 1, "present_segmented": 1, "absent_rejected": 1}
    assert chat["present"]["iou"] == pytest.approx(0.5) and chat["absent"]["rejected"]
    assert chat["met"]
    absent["targets"][0]["present"] = True
    absent["targets"][0]["mask"] = str(tmp_path / "mask.png")
    lines[1] = json.dumps(absent)
    (tmp_path / demo.CHAT_ANSWERS).write_text("\n".join(lines) + "\n")
    assert not demo.chat_results(tmp_path)["met"]
    assert "NOT met" in "\n".join(demo.chat_lines(demo.chat_results(tmp_path)))


def test_the_absent_chat_image_is_a_near_miss_as_the_assets_absent_expressions() -> None:
    rng = np.random.default_rng(0)
    for colour, shape in (("pink", "tree"), ("red", "circle"), ("blue", "car")):
        scene = demo.near_miss_scene(rng, 64, colour, shape)
        kinds = {(o.colour, o.shape) for o in scene.objects}
        assert (colour, shape) not in kinds
        assert colour in {c for c, _ in kinds} and shape in {s for _, s in kinds}
    assert demo.near_miss_scene(rng, 64, "mauve", "tree") is None  # no such colour
    for _ in range(5):
        present, absent = demo.chat_pair(rng, 64)
        target = present.objects[0]
        assert not absent.has(target.colour, target.shape)
        assert target.colour in {o.colour for o in absent.objects}
        assert target.shape in {o.shape for o in absent.objects}


def test_probe_results_count_the_one_name_decisions(tmp_path) -> None:
    seg = {"index": 0, "present": True, "mask": "m.png"}
    rej = {"index": 0, "present": False}
    # pairs: (present answered [SEG], absent [REJ]), ([REJ], [SEG]), ([SEG], nothing named)
    records = [[seg], [rej], [rej], [seg], [seg], []]
    lines = [json.dumps({"prompt": "q", "text": "t", "targets": r}) for r in records]
    (tmp_path / demo.CHAT_ANSWERS).write_text("\n".join(lines) + "\n")
    probe = demo.probe_results(tmp_path)
    assert probe == {"pairs": 3, "present_segmented": 2, "absent_rejected": 1}


def test_chat_strip_puts_the_pictures_side_by_side_over_the_caption(tmp_path) -> None:
    red, blue = (np.zeros((SIDE, SIDE, 3), np.uint8) for _ in range(2))
    red[..., 2], blue[..., 0] = 255, 255
    path = demo_report.write_chat_strip(tmp_path / "strip.png", [red, blue], ["a", "b"])
    strip = cv2.imread(str(path))
    height, gap = demo_report.STRIP_HEIGHT, demo_report.STRIP_GAP
    assert strip.shape == (height + 2 * demo_report.CAPTION_LINE, 2 * height + gap, 3)
    assert (strip[:height, :height] == (0, 0, 255)).all()
    assert (strip[:height, height + gap :] == (255, 0, 0)).all()
    assert (strip[:height, height : height + gap] == 255).all()
    assert (strip[height:] < 128).any()  # the caption's text
