"""The official `sam2` package as the oracle of the SAM 2 tests: its real config files, built
with Hydra overrides that only shrink widths and depths to our tiny size (every SAM 2.1 switch
stays as released), and the features its image predictor keeps. Only `sam2.modeling` and
`sam2.build_sam` (pure torch + Hydra) are used; nothing imports torchvision.
"""

from __future__ import annotations

import torch

OFFICIAL_CONFIG = "configs/sam2.1/sam2.1_hiera_{}.yaml"
# the official SAM 2.1 config files of each size in SAM2_SIZES (the tiny entry is ours)
OFFICIAL_FILES = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}
PROMPT_DIM, SIDE = 32, 128
# Shrinks the real tiny config to our tiny size: trunk, neck, and the (unused) memory parts.
TINY_OVERRIDES = [
    f"++model.image_size={SIDE}",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    f"++model.image_encoder.neck.d_model={PROMPT_DIM}",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    f"++model.image_encoder.neck.position_encoding.num_pos_feats={PROMPT_DIM}",
    f"++model.memory_attention.d_model={PROMPT_DIM}",
    f"++model.memory_attention.layer.d_model={PROMPT_DIM}",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.num_layers=1",
    f"++model.memory_attention.layer.self_attention.embedding_dim={PROMPT_DIM}",
    f"++model.memory_attention.layer.cross_attention.embedding_dim={PROMPT_DIM}",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    f"++model.memory_encoder.mask_downsampler.embed_dim={PROMPT_DIM}",
    f"++model.memory_encoder.fuser.layer.dim={PROMPT_DIM}",
    f"++model.memory_encoder.in_dim={PROMPT_DIM}",
]


def official_sam2(config: str, overrides: list[str]):
    """The official SAM2Base of a config file (`OFFICIAL_CONFIG`) with Hydra overrides."""
    from sam2.build_sam import build_sam2 as official_build

    return official_build(
        config, None, device="cpu", hydra_overrides_extra=overrides, apply_postprocessing=False
    )


def official_tiny_sam2(seed: int = 0):
    """The official tiny SAM 2.1 (`TINY_OVERRIDES`), random non-zero weights, eval mode."""
    torch.manual_seed(seed)
    model = official_sam2(OFFICIAL_CONFIG.format("t"), TINY_OVERRIDES)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.eval()


def official_features(official, pixels: torch.Tensor):
    """What SAM2ImagePredictor.set_image keeps of pixels [B,3,S,S]: (image_embed [B,D,g,g],
    high_res_feats [[B,D/8,4g,4g], [B,D/4,2g,2g]])."""
    backbone = official.forward_image(pixels)
    _, feats, _, sizes = official._prepare_backbone_features(backbone)
    feats[-1] = feats[-1] + official.no_mem_embed
    shaped = [
        feat.permute(1, 2, 0).view(len(pixels), -1, *size)
        for feat, size in zip(feats[::-1], sizes[::-1], strict=True)
    ][::-1]
    return shaped[-1], shaped[:-1]


def official_decode(official, embedding, high_res, prompts: torch.Tensor):
    """The official decoder as SAM2ImagePredictor calls it for k sparse tokens on one image
    (prompts [k, D], one token each, no mask prompt, single-mask output) -> (low-res logits
    [k, 1, 4g, 4g], IoU [k, 1])."""
    _, dense = official.sam_prompt_encoder(points=None, boxes=None, masks=None)
    masks, iou, _, _ = official.sam_mask_decoder(
        image_embeddings=embedding,
        image_pe=official.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=prompts[:, None],
        dense_prompt_embeddings=dense.expand(len(prompts), -1, -1, -1),
        multimask_output=False,
        repeat_image=True,
        high_res_features=high_res,
    )
    return masks, iou
