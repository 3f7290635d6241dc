"""Building a segmenter from files: load the LLaVA directory and the SAM checkpoint, add the
segmentation tokens, wrap LoRA, set the trainable set. The `Segmenter` constructor itself does
no I/O; this is the one place that does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.backbone import load_llava, load_tokenizer, resize_embeddings_to_mean
from model.lora import apply_lora, set_trainable
from model.losses import LossWeights
from model.sam import EarlyFusion, first_global_layer, load_sam_checkpoint
from model.segmenter import Segmenter, build_projector
from model.tokens import add_segmentation_tokens

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the segmenter (train_ds.py fills it from its flags).

    version: Hugging Face LLaVA directory (weights, config, tokenizer, image processor).
    vision_pretrained: SAM checkpoint in the original segment-anything layout.
    precision: fp32 | bf16 | fp16, the dtype the weights are loaded in.
    attn_implementation: sdpa | flash_attention_2 | eager.
    gradient_checkpointing: recompute LLM activations in backward to save memory.
    use_mm_start_end: add `<im_start>`/`<im_end>` tokens around the image tokens.
    out_dim: width of the projected `[SEG]` embedding; must equal SAM's prompt width.
    lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA on the language model
        (lora_r 0 = no LoRA, language model frozen apart from embeddings and LM head).
    train_mask_decoder: train SAM's mask decoder (else frozen).
    train_mm_projector: also train LLaVA's multimodal projector (frozen by default).
    early_fusion: M2SA early-feature fusion (first global-attention block of the SAM ViT).
    loss_weights: weights of CE, BCE and Dice.
    """

    version: str
    vision_pretrained: str
    precision: str = "bf16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    use_mm_start_end: bool = True
    out_dim: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train_mask_decoder: bool = True
    train_mm_projector: bool = False
    early_fusion: bool = False
    loss_weights: LossWeights = field(default_factory=LossWeights)

    @property
    def dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision must be one of {sorted(PRECISIONS)}, not {self.precision!r}"
            )
        return PRECISIONS[self.precision]


def build_segmenter(config: ModelConfig):
    """Load and assemble the segmenter. Returns (Segmenter, tokenizer with the new tokens)."""
    dtype = config.dtype
    llava = load_llava(config.version, dtype, config.attn_implementation)
    tokenizer = load_tokenizer(config.version)
    token_ids = add_segmentation_tokens(tokenizer, config.use_mm_start_end)
    if token_ids.image != llava.config.image_token_id:
        raise ValueError(
            f"{config.version}: the tokenizer's <image> id is {token_ids.image} but the model's "
            f"config says image_token_index = {llava.config.image_token_id}"
        )
    resize_embeddings_to_mean(llava, len(tokenizer))
    apply_lora(
        llava, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
    )
    if config.gradient_checkpointing:
        llava.activation_checkpointing_enable({"use_reentrant": False})
    sam = load_sam_checkpoint(config.vision_pretrained, dtype=dtype)
    prompt_dim = sam.config.mask_decoder_config.hidden_size
    if config.out_dim != prompt_dim:
        raise ValueError(
            f"--out_dim {config.out_dim} must equal the SAM prompt width {prompt_dim} "
            f"of {config.vision_pretrained}"
        )
    hidden_size = llava.config.text_config.hidden_size
    early_fusion = early_layer = None
    if config.early_fusion:
        early_layer = first_global_layer(sam.config)
        early_fusion = EarlyFusion(sam.config.vision_config.hidden_size, prompt_dim).to(dtype)
    model = Segmenter(
        llava=llava,
        sam=sam,
        text_hidden_fcs=build_projector(hidden_size, config.out_dim).to(dtype),
        token_ids=token_ids,
        loss_weights=config.loss_weights,
        early_fusion=early_fusion,
        early_layer=early_layer,
    )
    set_trainable(model, config.train_mask_decoder, config.train_mm_projector)
    return model, tokenizer
