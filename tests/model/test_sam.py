"""Tests of model/sam.py against the official segment-anything package (the oracle).

segment_anything imports torchvision in its package ``__init__`` (predictor / mask generator /
transforms), which has no CPU build here; a throw-away stand-in module tree is put into
``sys.modules`` only while ``segment_anything`` is imported. Only ``segment_anything.modeling``
(pure torch) is used.
"""

import importlib.util
import sys
import types
from functools import partial

import pytest
import torch
from torch import nn

from model.mask_models import VISION_PRETRAINED_EXPECTED, load_mask_model
from model.sam import (
    DROPPED_ORIGINAL_KEYS,
    SAM_PRESETS,
    TIED_HF_KEYS,
    EarlyFusion,
    build_sam,
    convert_original_state_dict,
    decode_masks,
    decode_masks_with_scores,
    decode_prompt_rows,
    dense_positional_embedding,
    encode_images,
    first_global_layer,
    hf_to_original_key,
    mask_prompt_embeddings,
    no_mask_dense_embedding,
    original_to_hf_key,
    postprocess_masks,
    sam_config_from_preset,
    sam_config_from_state_dict,
    save_sam_checkpoint,
    to_original_state_dict,
)
from model.tensor_files import UnsafeCheckpointError
from tests.utils.unsafe_checkpoints import write_unsafe_file

TOL = {"atol": 1e-5, "rtol": 1e-5}
TINY_IMAGE, TINY_PATCH, TINY_GRID = 64, 8, 8
NUM_PROMPTS = 3
RANDOM_STD = 0.3
_TORCHVISION_STUBS = {
    "torchvision": {},
    "torchvision.transforms": {},
    "torchvision.transforms.functional": {"resize": None, "to_pil_image": None},
    "torchvision.ops": {},
    "torchvision.ops.boxes": {"batched_nms": None, "box_area": None},
}


def _import_official_modeling() -> types.ModuleType:
    """Import segment_anything.modeling behind stand-in torchvision modules, then drop them.

    Stand-ins only when torchvision is absent, and removed right away: transformers probes
    ``torchvision`` with find_spec, which fails on a module without a spec.
    """
    if importlib.util.find_spec("torchvision") is not None:
        import segment_anything.modeling as modeling

        return modeling
    for name, attributes in _TORCHVISION_STUBS.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules.setdefault(name, module)
    try:
        import segment_anything.modeling as modeling
    finally:
        for name in _TORCHVISION_STUBS:
            if getattr(sys.modules.get(name), "__spec__", True) is None:
                del sys.modules[name]
    return modeling


sa = _import_official_modeling()


def official_sam(
    *,
    img_size=TINY_IMAGE,
    patch=TINY_PATCH,
    embed=32,
    depth=2,
    heads=2,
    global_idx=(1,),
    window=4,
    width=32,
    dec_mlp=64,
    dec_heads=2,
    iou_hidden=32,
    mask_in=16,
):
    """An official ``Sam`` wired like segment_anything.build_sam, with the given dims."""
    encoder = sa.ImageEncoderViT(
        img_size=img_size,
        patch_size=patch,
        embed_dim=embed,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        out_chans=width,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=global_idx,
        window_size=window,
    )
    grid = img_size // patch
    prompt = sa.PromptEncoder(
        embed_dim=width,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=mask_in,
    )
    decoder = sa.MaskDecoder(
        num_multimask_outputs=3,
        transformer_dim=width,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_hidden,
        transformer=sa.TwoWayTransformer(
            depth=2, embedding_dim=width, mlp_dim=dec_mlp, num_heads=dec_heads
        ),
    )
    return sa.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and buffer with N(0, RANDOM_STD): rel_pos / pos_embed start at zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * RANDOM_STD)
    return module


def tiny_original_state_dict(**dims) -> dict[str, torch.Tensor]:
    return randomise_(official_sam(**dims)).state_dict()


def meta_state_dict(**dims) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return official_sam(**dims).state_dict()


@pytest.fixture(scope="module")
def tiny_sam() -> nn.Module:
    return randomise_(build_sam(sam_config_from_preset("tiny")), seed=1)


PARITY_CASES = {
    "w32": {"width": 32, "dec_mlp": 64, "dec_heads": 2, "iou_hidden": 32},
    "w256": {"width": 256, "dec_mlp": 2048, "dec_heads": 8, "iou_hidden": 256},
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_parity_with_official_segment_anything(case, tmp_path):
    dims = PARITY_CASES[case]
    official = randomise_(official_sam(**dims))
    path = tmp_path / "sam.pth"
    torch.save(official.state_dict(), path)
    ours = load_mask_model(path)  # decoder heads from the default rule
    assert ours.config.mask_decoder_config.num_attention_heads == dims["dec_heads"]

    pixels = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(3))
    prompts = torch.randn(NUM_PROMPTS, dims["width"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected_embeddings = official.image_encoder(pixels)
        expected_pe = official.prompt_encoder.get_dense_pe()
        _, expected_dense = official.prompt_encoder(points=None, boxes=None, masks=None)
        expected_masks, expected_iou = official.mask_decoder(
            image_embeddings=expected_embeddings[:1],
            image_pe=expected_pe,
            sparse_prompt_embeddings=prompts[:, None, :],
            dense_prompt_embeddings=expected_dense.expand(NUM_PROMPTS, -1, -1, -1),
            multimask_output=False,
        )
        embeddings, early = encode_images(ours, pixels)
        masks, iou = decode_masks_with_scores(ours, embeddings[0], prompts)

    assert early is None
    assert embeddings.shape == (2, dims["width"], TINY_GRID, TINY_GRID)
    assert expected_embeddings.abs().mean() > 0.1  # non-trivial values are compared
    torch.testing.assert_close(embeddings, expected_embeddings, **TOL)
    torch.testing.assert_close(dense_positional_embedding(ours), expected_pe, **TOL)
    torch.testing.assert_close(no_mask_dense_embedding(ours), expected_dense, **TOL)
    assert masks.shape == (NUM_PROMPTS, 4 * TINY_GRID, 4 * TINY_GRID)
    assert masks.std() > 0.1
    torch.testing.assert_close(masks, expected_masks[:, 0], **TOL)
    torch.testing.assert_close(iou, expected_iou[:, 0], **TOL)
    torch.testing.assert_close(decode_masks(ours, embeddings[:1], prompts), masks)


def test_chained_passes_match_official_prompt_encoder_with_mask_input(tmp_path):
    """CoReS's two passes with the official modules: pass 1 with no mask, its low-res logits
    as `PromptEncoder(masks=...)` (mask_downscaling) for pass 2; ours with one decoder call per
    pass over rows on different images."""
    official = randomise_(official_sam())
    path = tmp_path / "sam.pth"
    torch.save(official.state_dict(), path)
    ours = load_mask_model(path)
    pixels = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(3))
    coarse_prompts, final_prompts = torch.randn(
        2, NUM_PROMPTS, 32, generator=torch.Generator().manual_seed(4)
    )
    row_image = torch.tensor([0, 1, 1])
    with torch.no_grad():
        embeddings = official.image_encoder(pixels)
        pe = official.prompt_encoder.get_dense_pe()
        _, no_mask = official.prompt_encoder(points=None, boxes=None, masks=None)
        expected_coarse, expected_final, expected_iou = [], [], []
        for row, image in enumerate(row_image.tolist()):
            decode = partial(
                official.mask_decoder,
                image_embeddings=embeddings[image : image + 1],
                image_pe=pe,
                multimask_output=False,
            )
            low, _ = decode(
                sparse_prompt_embeddings=coarse_prompts[row, None, None],
                dense_prompt_embeddings=no_mask,
            )
            _, dense = official.prompt_encoder(points=None, boxes=None, masks=low)
            final, iou = decode(
                sparse_prompt_embeddings=final_prompts[row, None, None],
                dense_prompt_embeddings=dense,
            )
            expected_coarse.append(low[0, 0])
            expected_final.append(final[0, 0])
            expected_iou.append(iou[0, 0])
        rows = embeddings[row_image]
        no_mask_rows = no_mask_dense_embedding(ours).expand(NUM_PROMPTS, -1, -1, -1)
        coarse, _ = decode_prompt_rows(ours, rows, coarse_prompts, no_mask_rows)
        dense = mask_prompt_embeddings(ours, coarse)
        final, iou = decode_prompt_rows(ours, rows, final_prompts, dense)
    assert dense.shape == (NUM_PROMPTS, 32, TINY_GRID, TINY_GRID)
    torch.testing.assert_close(coarse, torch.stack(expected_coarse), **TOL)
    torch.testing.assert_close(final, torch.stack(expected_final), **TOL)
    torch.testing.assert_close(iou, torch.stack(expected_iou), **TOL)
    assert (
        final - decode_prompt_rows(ours, rows, final_prompts, no_mask_rows)[0]
    ).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"expected low-resolution mask logits \[K,32,32\]"):
        mask_prompt_embeddings(ours, coarse[:, :16])


def test_postprocess_masks_matches_official():
    official = official_sam()
    low_res = torch.randn(NUM_PROMPTS, 4 * TINY_GRID, 4 * TINY_GRID).half()
    resized, original = (64, 45), (71, 50)  # a portrait image resized to longest side 64
    expected = official.postprocess_masks(low_res.float()[:, None], resized, original)[:, 0]
    result = postprocess_masks(low_res, TINY_IMAGE, resized, original)
    assert result.dtype == torch.float32 and result.shape == (NUM_PROMPTS, *original)
    torch.testing.assert_close(result, expected)
    assert not torch.allclose(result, postprocess_masks(low_res, TINY_IMAGE, (64, 64), original))


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        (
            {"embed": 1280, "depth": 32, "heads": 16, "global_idx": (7, 15, 23, 31)},
            {
                "hidden_size": 1280,
                "num_hidden_layers": 32,
                "num_attention_heads": 16,
                "global_attn_indexes": [7, 15, 23, 31],
                "mlp_dim": 5120,
            },
        ),
        (
            {"embed": 768, "depth": 12, "heads": 12, "global_idx": (2, 5, 8, 11)},
            {
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "global_attn_indexes": [2, 5, 8, 11],
                "mlp_dim": 3072,
            },
        ),
    ],
    ids=["vit_h", "vit_b"],
)
def test_config_inferred_from_real_sam_shapes(dims, expected):
    state = meta_state_dict(
        img_size=1024,
        patch=16,
        window=14,
        width=256,
        dec_mlp=2048,
        dec_heads=8,
        iou_hidden=256,
        **dims,
    )
    config = sam_config_from_state_dict(state)
    vision = config.vision_config
    assert {name: getattr(vision, name) for name in expected} == expected
    assert (vision.window_size, vision.image_size, vision.patch_size) == (14, 1024, 16)
    assert (vision.output_channels, vision.num_pos_feats) == (256, 128)
    prompt, decoder = config.prompt_encoder_config, config.mask_decoder_config
    assert (prompt.hidden_size, prompt.image_embedding_size, prompt.mask_input_channels) == (
        256,
        64,
        16,
    )
    assert (decoder.hidden_size, decoder.mlp_dim, decoder.num_hidden_layers) == (256, 2048, 2)
    assert (decoder.num_attention_heads, decoder.num_multimask_outputs) == (8, 3)
    assert (decoder.iou_head_depth, decoder.iou_head_hidden_dim) == (3, 256)
    assert (
        sam_config_from_state_dict(state, decoder_heads=4).mask_decoder_config.num_attention_heads
        == 4
    )

    # The full-size mapping covers exactly the parameters of a SamModel of the inferred config.
    with torch.device("meta"):
        model_shapes = {k: v.shape for k, v in build_sam(config).state_dict().items()}
    assert {k: v.shape for k, v in convert_original_state_dict(state).items()} == model_shapes


def test_presets_match_inferred_configs():
    vit_h = sam_config_from_preset("vit_h")
    assert first_global_layer(vit_h) == 7
    assert first_global_layer(sam_config_from_preset("vit_b")) == 2
    assert vit_h.vision_config.mlp_dim == 5120 and vit_h.vision_config.window_size == 14
    assert set(SAM_PRESETS) == {"vit_h", "vit_l", "vit_b", "tiny"}
    tiny_state = to_original_state_dict(build_sam(sam_config_from_preset("tiny")).state_dict())
    assert (
        sam_config_from_state_dict(tiny_state).to_dict() == sam_config_from_preset("tiny").to_dict()
    )
    with pytest.raises(ValueError, match="unknown SAM preset 'vit_x'"):
        sam_config_from_preset("vit_x")


def test_all_global_encoder_infers_window_zero():
    vision = sam_config_from_state_dict(meta_state_dict(global_idx=(0, 1))).vision_config
    assert (list(vision.global_attn_indexes), vision.window_size) == ([0, 1], 0)


def test_key_mapping_examples():
    assert (
        original_to_hf_key("image_encoder.blocks.3.norm1.weight")
        == "vision_encoder.layers.3.layer_norm1.weight"
    )
    assert (
        original_to_hf_key("mask_decoder.iou_prediction_head.layers.1.bias")
        == "mask_decoder.iou_prediction_head.layers.0.bias"
    )
    assert (
        original_to_hf_key("mask_decoder.output_hypernetworks_mlps.2.layers.2.weight")
        == "mask_decoder.output_hypernetworks_mlps.2.proj_out.weight"
    )
    assert (
        original_to_hf_key("prompt_encoder.mask_downscaling.6.bias")
        == "prompt_encoder.mask_embed.conv3.bias"
    )
    for tied, source in TIED_HF_KEYS.items():
        assert (
            hf_to_original_key(tied)
            == hf_to_original_key(source)
            == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        )
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        original_to_hf_key("model.embed_tokens.weight")


def test_key_mapping_round_trip_is_exact():
    original = tiny_original_state_dict()
    with_buffers = {**original, **{key: torch.ones(3, 1, 1) for key in DROPPED_ORIGINAL_KEYS}}
    hf = convert_original_state_dict(with_buffers)
    assert set(hf) == set(build_sam(sam_config_from_state_dict(original)).state_dict())
    back = to_original_state_dict(hf)
    assert set(back) == set(original)
    assert all(torch.equal(back[key], original[key]) for key in original)
    again = convert_original_state_dict(back)
    assert set(again) == set(hf) and all(torch.equal(again[key], hf[key]) for key in hf)


def test_loading_is_strict(tmp_path):
    original = tiny_original_state_dict()
    extra = {**original, "image_encoder.blocks.0.attn.extra_scale": torch.ones(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth: unexpected .*blocks\.0\.attn\.extra_scale"):
        load_mask_model(tmp_path / "extra.pth")

    dropped = "mask_decoder.iou_token.weight"
    torch.save({k: v for k, v in original.items() if k != dropped}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth: missing keys \['mask_decoder\.iou_token"):
        load_mask_model(tmp_path / "missing.pth")

    sam2 = {
        "image_encoder.trunk.patch_embed.proj.weight": torch.ones(2, 3, 7, 7),
        "image_encoder.neck.convs.0.conv.weight": torch.ones(2, 2, 1, 1),
        "sam_mask_decoder.iou_token.weight": torch.ones(1, 2),
    }
    torch.save({"model": sam2}, tmp_path / "sam2.1_hiera_tiny.pt")
    not_sam2 = r"hiera_tiny\.pt: not a SAM 2 checkpoint .*'no_mem_embed'"
    with pytest.raises(ValueError, match=not_sam2):
        load_mask_model(tmp_path / "sam2.1_hiera_tiny.pt")

    torch.save({"model.embed_tokens.weight": torch.ones(4, 2)}, tmp_path / "llava.bin")
    not_sam = r"llava\.bin: not a SAM or SAM 2 checkpoint.*'image_encoder\.pos"
    with pytest.raises(ValueError, match=not_sam):
        load_mask_model(tmp_path / "llava.bin")


def test_wrapped_checkpoint_loads_and_ties_pe(tmp_path):
    original = tiny_original_state_dict()
    torch.save({"model": original, "epoch": 3}, tmp_path / "wrapped.pt")
    model = load_mask_model(tmp_path / "wrapped.pt", dtype=torch.float64)
    assert not model.training
    pe = model.shared_image_embedding.positional_embedding
    assert model.prompt_encoder.shared_embedding.positional_embedding is pe
    assert pe.dtype == torch.float64
    torch.testing.assert_close(
        pe, original["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].double()
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_load_round_trip(tiny_sam, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    save_sam_checkpoint(tiny_sam, path)
    loaded = load_mask_model(path)
    assert loaded.config.to_dict() == tiny_sam.config.to_dict()
    expected_sd, loaded_sd = tiny_sam.state_dict(), loaded.state_dict()
    assert all(torch.equal(loaded_sd[key], expected_sd[key]) for key in expected_sd)
    pixels = torch.randn(1, 3, TINY_IMAGE, TINY_IMAGE)
    prompts = torch.randn(NUM_PROMPTS, 32)
    (ours, _), (theirs, _) = encode_images(tiny_sam, pixels), encode_images(loaded, pixels)
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        expected_masks = decode_masks(tiny_sam, ours, prompts)
        assert torch.equal(decode_masks(loaded, ours, prompts), expected_masks)


def test_saving_unrecoverable_decoder_heads_warns(tmp_path):
    model = build_sam(sam_config_from_state_dict(tiny_original_state_dict(), decoder_heads=4))
    with pytest.warns(UserWarning, match="decoder_heads=4"):
        save_sam_checkpoint(model, tmp_path / "heads4.pth")
    assert (
        load_mask_model(
            tmp_path / "heads4.pth", decoder_heads=4
        ).config.mask_decoder_config.num_attention_heads
        == 4
    )


def test_encode_images_returns_early_block_and_runs_encoder_once(tiny_sam):
    pixels = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE)
    calls = []
    layer = first_global_layer(tiny_sam.config)
    assert layer == 1
    hook = tiny_sam.vision_encoder.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        embeddings, early = encode_images(tiny_sam, pixels, early_layer=layer)
    finally:
        hook.remove()
    assert calls == [1]
    encoder = tiny_sam.vision_encoder
    with torch.no_grad():
        expected = encoder.patch_embed(pixels) + encoder.pos_embed
        for block in encoder.layers[: layer + 1]:
            expected = block(expected)
    assert early.shape == (2, 32, TINY_GRID, TINY_GRID)
    torch.testing.assert_close(early, expected.permute(0, 3, 1, 2))
    torch.testing.assert_close(embeddings, encode_images(tiny_sam, pixels)[0])
    assert not early.requires_grad and not embeddings.requires_grad
    assert not encoder.layers[layer]._forward_hooks  # the capture hook was removed


def test_early_fusion_shapes_and_parameter_names():
    fusion = EarlyFusion(64, 32)
    assert [name for name, _ in fusion.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    features = torch.randn(2, 64, TINY_GRID, TINY_GRID)
    assert fusion(features).shape == (2, 32, TINY_GRID, TINY_GRID)
    normalised = fusion[1](fusion[0](features))  # channels-first layer norm: per-pixel stats
    torch.testing.assert_close(
        normalised.mean(dim=1), torch.zeros(2, TINY_GRID, TINY_GRID), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        normalised.var(dim=1, unbiased=False),
        torch.ones(2, TINY_GRID, TINY_GRID),
        atol=1e-3,
        rtol=0,
    )


def test_decode_masks_is_one_call_and_differentiable(tiny_sam):
    embeddings, _ = encode_images(tiny_sam, torch.randn(1, 3, TINY_IMAGE, TINY_IMAGE))
    prompts = torch.randn(NUM_PROMPTS, 32, requires_grad=True)
    calls = []
    hook = tiny_sam.mask_decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        masks = decode_masks(tiny_sam, embeddings[0], prompts)
    finally:
        hook.remove()
    assert calls == [1]
    singles = torch.stack([decode_masks(tiny_sam, embeddings, p[None])[0] for p in prompts])
    torch.testing.assert_close(masks, singles, **TOL)

    tiny_sam.zero_grad()
    masks.square().mean().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    decoder = tiny_sam.mask_decoder
    trained = (
        decoder.transformer.layers[0].self_attn.q_proj.weight,
        decoder.iou_token.weight,
        decoder.upscale_conv1.weight,
        decoder.output_hypernetworks_mlps[0].proj_in.weight,
    )
    for parameter in trained:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    tiny_sam.zero_grad()


def test_a_sam_file_holding_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = write_unsafe_file(tmp_path / "sam.pth", marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_mask_model(path)
    message = str(error.value)
    assert message.startswith(f"{path}: refusing to load: it holds Python objects")
    assert message.endswith(VISION_PRETRAINED_EXPECTED)
    assert "\n" not in message and not marker.exists()
