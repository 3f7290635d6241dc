"""Tests of model/sam2.py against the official `sam2` package (the oracle, `tests.sam2_oracle`).

The official tiny model (the real `sam2.1_hiera_t.yaml`, shrunk: high-resolution features,
object-score head, no_mem_embed added directly, as released) is saved as the released files
are, `{"model": state_dict}` in a .pt with its video-tracking parts, and loaded by ours.
"""

from pathlib import Path

import pytest
import torch

from model.sam2 import (
    SAM2_SIZES,
    TIED_HF_KEYS,
    build_sam2,
    convert_original_state_dict,
    decode,
    encode_levels,
    is_tracking_key,
    mask_prompt_embeddings,
    no_mask_dense_embedding,
    postprocess_masks,
    project_high_res,
    sam2_config_from_preset,
    sam2_config_from_state_dict,
    sam2_from_original_state_dict,
    save_sam2_checkpoint,
    to_original_state_dict,
)
from tests.sam2_oracle import (
    OFFICIAL_CONFIG,
    OFFICIAL_FILES,
    PROMPT_DIM,
    SIDE,
    official_decode,
    official_features,
    official_sam2,
    official_tiny_sam2,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def official():
    """The official tiny SAM 2.1 with random (non-zero) weights everywhere, eval mode."""
    return official_tiny_sam2()


@pytest.fixture(scope="module")
def released_file(official, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ours(released_file):
    from model.mask_models import load_mask_model

    return load_mask_model(released_file, dtype=torch.float32)


def test_loads_the_released_layout_strictly_and_only_leaves_out_tracking_parts(official, ours):
    from model.sam2 import Sam2Model

    assert isinstance(ours, Sam2Model)
    official_keys = set(official.state_dict())
    image_keys = {key for key in official_keys if not is_tracking_key(key)}
    tracking = official_keys - image_keys
    assert {key.split(".")[0] for key in tracking} == {
        "memory_attention",
        "memory_encoder",
        "obj_ptr_proj",
        "obj_ptr_tpos_proj",
        "mask_downsample",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "no_obj_ptr",
        "no_obj_embed_spatial",
    }
    saved = to_original_state_dict(ours.state_dict())
    assert set(saved) == image_keys
    for key in image_keys:
        torch.testing.assert_close(saved[key], official.state_dict()[key], rtol=0, atol=0)


def test_encoder_levels_equal_the_official_image_features(official, ours):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        embedding, high_res = official_features(official, pixels)
        level0, level1, ours_embedding = encode_levels(ours, pixels)
        ours_high = project_high_res(ours, level0, level1)
    torch.testing.assert_close(ours_embedding, embedding, **TOL)
    assert ours_embedding.shape == (2, PROMPT_DIM, SIDE // 16, SIDE // 16)
    for mine, theirs in zip(ours_high, high_res, strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)


def test_decoder_with_text_prompts_equals_the_official_decoder(official, ours):
    """k sparse tokens on one image (LISA's use: one token per [SEG]), and the mask prompt."""
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, SIDE, SIDE)
    prompts = torch.randn(3, PROMPT_DIM)
    with torch.no_grad():
        masks, iou = official_decode(official, *official_features(official, pixels), prompts)
        level0, level1, ours_embedding = encode_levels(ours, pixels)
        ours_masks, ours_iou = decode(
            ours,
            ours_embedding,
            project_high_res(ours, level0, level1),
            prompts[None],
            no_mask_dense_embedding(ours),
        )
        torch.testing.assert_close(ours_masks[0], masks[:, 0], **TOL)
        torch.testing.assert_close(ours_iou[0], iou[:, 0], **TOL)
        low_res = torch.randn(2, SIDE // 4, SIDE // 4)
        _, official_dense = official.sam_prompt_encoder(
            points=None, boxes=None, masks=low_res[:, None]
        )
        torch.testing.assert_close(mask_prompt_embeddings(ours, low_res), official_dense, **TOL)


def test_postprocess_is_one_bilinear_resize_to_the_original_size():
    """SAM2Transforms.postprocess_masks: interpolate(masks, orig_hw, bilinear) and nothing else."""
    low_res = torch.randn(2, 32, 32)
    out = postprocess_masks(low_res, (45, 70))
    expected = torch.nn.functional.interpolate(
        low_res[:, None], (45, 70), mode="bilinear", align_corners=False
    )[:, 0]
    assert out.dtype == torch.float32 and out.shape == (2, 45, 70)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _official_trunk_settings(file_letter: str) -> dict:
    """The trunk settings of a released config file, Hiera's defaults filled in."""
    import inspect

    from hydra import compose
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = {
        name: parameter.default for name, parameter in inspect.signature(Hiera).parameters.items()
    }
    trunk = compose(config_name=OFFICIAL_CONFIG.format(file_letter)).model.image_encoder.trunk
    return {**defaults, **{key: value for key, value in trunk.items() if key != "_target_"}}


@pytest.mark.parametrize("name", sorted(OFFICIAL_FILES))
def test_size_table_holds_the_released_trunk_settings(name):
    """Each entry of SAM2_SIZES equals the released config file's trunk (the settings the
    weights do not show), keyed by what they do show."""
    import sam2  # noqa: F401  (registers the package's config module with Hydra)

    settings = _official_trunk_settings(OFFICIAL_FILES[name])
    key = (settings["embed_dim"], tuple(settings["stages"]))
    size = SAM2_SIZES[key]
    assert size.name == name
    assert size.num_heads == settings["num_heads"]
    assert size.window_spec == tuple(settings["window_spec"])
    assert size.global_att_blocks == tuple(settings["global_att_blocks"])
    background = tuple(settings["window_pos_embed_bkg_spatial_size"])
    assert sam2_config_from_preset(name).vision_config.backbone_config.to_dict()[
        "window_positional_embedding_background_size"
    ] == list(background)


def test_released_tiny_size_loads_strictly_with_its_real_config():
    """sam2.1_hiera_t.yaml as released (random weights): its state dict loads strictly and the
    config read from its shapes gives the official heads per block."""
    official = official_sam2(OFFICIAL_CONFIG.format("t"), [])
    state = official.state_dict()
    config = sam2_config_from_state_dict(state)
    backbone = config.vision_config.backbone_config
    heads = [block.attn.num_heads for block in official.image_encoder.trunk.blocks]
    stage_ends = [sum(backbone.blocks_per_stage[: s + 1]) - 1 for s in range(4)]
    assert [heads[end] for end in stage_ends] == backbone.num_attention_heads_per_stage
    model = sam2_from_original_state_dict(state, "hiera_t")
    assert model.config.prompt_encoder_config.image_size == 1024
    assert sam2_config_from_preset("hiera_t").to_dict() == config.to_dict()


def test_round_trip_through_our_files(ours, tmp_path):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"sam2{suffix}"
        save_sam2_checkpoint(ours, path)
        from model.mask_models import load_mask_model

        again = load_mask_model(path, dtype=torch.float32)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
        tied = next(iter(TIED_HF_KEYS))
        assert again.get_buffer(tied) is again.get_buffer(TIED_HF_KEYS[tied])


def test_tiny_preset_is_in_the_size_table_and_builds():
    model = build_sam2(sam2_config_from_preset("tiny"))
    config = sam2_config_from_state_dict(to_original_state_dict(model.state_dict()))
    assert config.to_dict() == model.config.to_dict()
    assert any(size.name == "tiny" for size in SAM2_SIZES.values())


def test_unknown_key_and_unknown_size_are_named(ours):
    state = to_original_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match="sam_mask_decoder.extra"):
        convert_original_state_dict({**state, "sam_mask_decoder.extra": torch.zeros(1)})
    narrow = dict(state)
    narrow["image_encoder.trunk.patch_embed.proj.weight"] = torch.zeros(12, 3, 7, 7)
    with pytest.raises(ValueError, match="width 12 .* none of the known SAM 2 sizes"):
        sam2_config_from_state_dict(narrow)
    missing = {k: v for k, v in state.items() if not k.startswith("sam_mask_decoder.conv_s0")}
    with pytest.raises(ValueError, match=r"src: missing keys \['sam_mask_decoder.conv_s0.bias'"):
        sam2_from_original_state_dict(missing, "src")


def test_early_fusion_on_sam2_stops_the_build_in_one_line(tmp_path):
    """M2SA's fusion reads a SAM ViT block; SAM 2 has none, and the build says so."""
    from model.tiny import build_tiny_segmenter

    with pytest.raises(ValueError, match=r"--early_fusion \(M2SA\).*sam2_tiny\.pt is a sam2"):
        build_tiny_segmenter(tmp_path, segmenter="sam2", early_fusion=True)


def test_a_missing_point_table_and_an_unexpected_key_are_named_in_the_files_names(ours):
    state = to_original_state_dict(ours.state_dict())
    points = {k: v for k, v in state.items() if "point_embeddings" not in k}
    with pytest.raises(ValueError, match=r"point_embeddings\.\*\.weight"):
        sam2_from_original_state_dict(points, "src")
