"""The memory planner behind `train_ds.py --estimate_memory [--json] [--gpu_memory_gb N]`: the
per-GPU memory of the configured run by part, without loading any weight.

The segmenter is built on the meta device from configuration alone (`--version`'s config.json
when it is a local directory, else the LLaMA shape its name says: 7B or 13B; CLIP from
`--vision_tower`'s name; SAM from `--vision_pretrained`'s name: vit_h, vit_l or vit_b), LoRA
applied and the trainable set marked exactly as `model.builder` does, so parameter counts are
the real ones. Then, per GPU of `--estimate_gpus` (default 1):

- weights: every parameter in the run's precision (ZeRO-3: partitioned, plus the largest
  layer gathered in fp32, as DeepSpeed counts it).
- gradients and optimizer states of the trainable parameters, as DeepSpeed's estimators count
  them (16-bit gradients 2, fp32 gradients 4, fp32 master 4, Adam moments 8 bytes per
  parameter, over the GPUs; with `--offload_optimizer` they live in CPU memory). With every
  parameter trainable the model states equal `estimate_zero2_model_states_mem_needs` /
  `estimate_zero3_model_states_mem_needs` (tests check it).
- activations: the peak of one micro-batch's forward and backward (`activation_bytes`), over
  `batch_size x num_classes_per_sample` conversations, each padded to image tokens +
  PLANNED_TEXT_TOKENS (and at `--model_max_length`, the worst case), with and without
  gradient checkpointing. A step holds its large tensors in turn, so the peak is the largest of
  four moments, not their sum: the end of the forward (what the language model keeps for
  backward, `layer_activation_bytes` per layer, the LM head's logits and log-softmax, and the
  mask losses' per-pixel tensors at the image size), the LM head's backward (its logits'
  gradients beside them), the backward of the last layer, the first to run backward (a
  recomputed layer and the gradients its MLP's backward holds), and the end of backward (every
  gradient). The LM head runs on the scored rows (trimmed), or with `--full_logits` on every
  position.

The frozen image encoders run without a graph; their transient peak, the mask decoder's own
activations and the allocator's fragmentation are not modelled (on a GPU, RUNTIME_OVERHEAD_GB
stands for the CUDA context and allocator slack). `benchmarks/train_step.py` checks the
activation model against the live-tensor peak of real steps on CPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

GIB = 2**30
FP32_BYTES = 4
BOOL_BYTES = 1
# DeepSpeed's bytes per trainable parameter beside the 16-bit weight: 16-bit and fp32 gradients,
# fp32 master weights, Adam's two moments
GRAD_16BIT_BYTES, GRAD_FP32_BYTES, MASTER_BYTES, ADAM_BYTES = 2, 4, 4, 8
ZERO3_LARGEST_LAYER_BYTES = 4
# a conversation's text beside its image tokens (system prompt, question, answer): the m2sa
# mix's referring and MMR questions with their answers mostly fit in it; long VQA dialogues
# reach the --model_max_length case
PLANNED_TEXT_TOKENS = 160
RUNTIME_OVERHEAD_GB = 1.0
SWIGLU_SAVED = 3  # silu input, silu output, up-projection output
# the MLP's backward holds the gradients of its two products (gate and up) and of the layer's
# input and output beside the tensors the layer kept
MLP_BACKWARD_PRODUCTS, MLP_BACKWARD_HIDDEN = 2, 2
# the LM head's fp32 [rows, V] tensors: the log-softmax in the forward (beside the logits in
# the run's precision), the NLL gradient and the log-softmax gradient in its backward
HEAD_FORWARD_FP32, HEAD_BACKWARD_FP32 = 1, 2
# fp32 values the mask losses hold per target pixel at the end of the forward (model.losses:
# the mask logits at the image size and their sigmoid, BCE's and Dice's float targets and
# valid-pixel weights, and the products they keep for backward), counted with the live-tensor
# trace of benchmarks/train_step.py
MASK_LOSS_VALUES = 8
# the masks' resolution in the loss when planning without data: a COCO image (640 x 480)
PLANNED_MASK_PIXELS = 640 * 480
LLAMA_SHAPES = {
    "13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
}
LLAMA_VOCAB = 32000
CLIP_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=14,
)  # fmt: skip
CLIP_DEFAULT_SIZE, CLIP_336 = 224, 336
SAM_NAMES = ("vit_h", "vit_l", "vit_b")
# SAM 2 sizes by the released file names (sam2.1_hiera_large.pt, ...; ours: sam2_tiny.pt), in
# the order they are looked for; a SAM 2 file named otherwise counts as the largest
SAM2_NAMES = (
    ("hiera_large", "hiera_l"),
    ("hiera_base_plus", "hiera_b+"),
    ("hiera_small", "hiera_s"),
    ("hiera_tiny", "hiera_t"),
    ("tiny", "tiny"),
)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    largest_layer: int


@dataclass(frozen=True)
class ActivationShape:
    """What one language-model layer keeps per token: widths and the precision's bytes."""

    hidden_size: int
    kv_width: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    lora_targets: int
    lora_dropout: bool
    bytes_per_value: int


def layer_activation_bytes(shape: ActivationShape) -> int:
    """Bytes one LLaMA layer keeps per token for backward (frozen linear layers keep no input):
    two RMSNorm inputs in fp32; per LoRA target its dropped input (and the dropout mask);
    rotated q and k, v and the attention output (sdpa); the SwiGLU's three products."""
    h, kv, p = shape.hidden_size, shape.kv_width, shape.bytes_per_value
    norms = 2 * FP32_BYTES * h
    lora = shape.lora_targets * h * (p + (BOOL_BYTES if shape.lora_dropout else 0))
    attention = p * (h + kv) + p * kv + p * h
    mlp = SWIGLU_SAVED * p * shape.intermediate_size
    return norms + lora + attention + mlp


def mlp_backward_bytes(shape: ActivationShape) -> int:
    """Bytes per token the MLP's backward holds beside the layer's kept tensors: the gradients
    of the gate and up products and of the layer's input and output."""
    intermediate = MLP_BACKWARD_PRODUCTS * shape.intermediate_size
    return shape.bytes_per_value * (intermediate + MLP_BACKWARD_HIDDEN * shape.hidden_size)


@dataclass(frozen=True)
class StepGradients:
    """Gradient bytes a plain backward creates inside the step (a DeepSpeed run counts them in
    its model states instead, so the planner's own figures pass none): the LM head's, made
    first since the head runs last, and all of them, held at the end."""

    head: int = 0
    total: int = 0


def activation_bytes(
    shape: ActivationShape,
    tokens: int,
    head_rows: int,
    checkpointing: bool,
    target_pixels: int = 0,
    gradients: StepGradients = StepGradients(),
    output_holds_logits: bool = True,
) -> int:
    """Peak bytes of one micro-batch's forward and backward: the language model over `tokens`
    positions (padding included), the LM head over `head_rows`, the mask losses over
    `target_pixels` (targets x image pixels), and `gradients` as they appear.
    `output_holds_logits`: the full-logit path returns the logits, held to the end of the step;
    trimmed logits are freed once the head's backward has run. The largest of:

    - the end of the forward: each layer's input (with checkpointing) or everything each layer
      keeps (without), the embeddings, the head's logits and log-softmax, the mask losses;
    - the head's backward: the same language-model tensors, the head's tensors and their two
      gradients;
    - the last layer's backward: the kept tensors, the recomputed layer (checkpointing), its
      MLP's backward, the logits if the output holds them and the head's gradient;
    - the end of the backward: every gradient, beside the logits if the output holds them.
    """
    p, hidden = shape.bytes_per_value, shape.hidden_size
    layer = layer_activation_bytes(shape) * tokens
    embeddings = p * hidden * tokens
    if checkpointing:  # each layer's input kept, one layer recomputed at a time
        kept, recomputed = shape.num_layers * embeddings + embeddings, layer
    else:
        kept, recomputed = shape.num_layers * layer + embeddings, 0
    logits = head_rows * shape.vocab_size
    head_forward = logits * (p + HEAD_FORWARD_FP32 * FP32_BYTES)
    forward_end = kept + head_forward + MASK_LOSS_VALUES * FP32_BYTES * target_pixels
    head_backward = kept + head_forward + HEAD_BACKWARD_FP32 * FP32_BYTES * logits
    held = logits * p if output_holds_logits else 0
    layer_backward = kept + recomputed + mlp_backward_bytes(shape) * tokens + held + gradients.head
    backward_end = gradients.total + held
    return max(forward_end, head_backward, layer_backward, backward_end)


def model_state_bytes(
    counts: ParameterCounts, stage: int, offload: bool, gpus: int, bytes_per_value: int
) -> dict[str, int]:
    """Per-GPU weights, gradients and optimizer states (DeepSpeed's accounting; see module)."""
    trainable = counts.trainable
    frozen = counts.total - trainable
    states = GRAD_16BIT_BYTES + GRAD_FP32_BYTES + MASTER_BYTES + ADAM_BYTES
    gradient_share = (GRAD_16BIT_BYTES + GRAD_FP32_BYTES) / states
    sharded = 0 if offload else int(states * trainable / gpus)
    if stage == 3:
        # DeepSpeed's ZeRO-3 count holds the trainable 16-bit weights inside its 18 bytes unless
        # the optimizer is offloaded; the frozen ones are partitioned 16-bit weights
        on_gpu = counts.total if offload else frozen
        weights = ZERO3_LARGEST_LAYER_BYTES * counts.largest_layer + int(
            bytes_per_value * on_gpu / gpus
        )
    else:
        weights = bytes_per_value * counts.total
    gradients = int(sharded * gradient_share)
    return {"weights": weights, "gradients": gradients, "optimizer": sharded - gradients}


@dataclass(frozen=True)
class MemoryPlan:
    """One setting's per-GPU bytes by part."""

    zero_stage: int
    offload_optimizer: bool
    gradient_checkpointing: bool
    weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_at_max_length: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    @property
    def total_at_max_length(self) -> int:
        return self.total - self.activations + self.activations_at_max_length

    def to_json(self) -> dict:
        """The setting and its parts in GB (keys "<part>_gb"), "total_gb" and
        "total_gb_at_max_length"."""
        values = {}
        for name, value in asdict(self).items():
            is_bytes = (
                isinstance(value, int) and not isinstance(value, bool) and name != "zero_stage"
            )
            values[f"{name}_gb" if is_bytes else name] = value / GIB if is_bytes else value
        values["total_gb"] = self.total / GIB
        values["total_gb_at_max_length"] = self.total_at_max_length / GIB
        return values


# --- building the model on meta ---
def _llava_config(config):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from model.backbone import qwen_vl_family

    directory = Path(config.version)
    if (directory / "config.json").is_file():
        values = json.loads((directory / "config.json").read_text())
        if (family := qwen_vl_family(values)) is not None:
            return family.model_class.config_class.from_pretrained(directory)
        if "text_config" in values:
            return LlavaConfig.from_pretrained(directory)
        text = LlamaConfig(**{k: v for k, v in values.items() if k != "model_type"})
    else:
        size = next((s for s in LLAMA_SHAPES if s in config.version.lower()), None)
        if size is None:
            raise ValueError(
                f"--version {config.version!r}: no local config.json and no 7b/13b in the name; "
                "give a local LLaVA directory (only its config.json is read)"
            )
        text = LlamaConfig(**LLAMA_SHAPES[size], vocab_size=LLAMA_VOCAB)
    image = CLIP_336 if str(CLIP_336) in str(config.vision_tower) else CLIP_DEFAULT_SIZE
    vision = CLIPVisionConfig(**CLIP_L14, image_size=image)
    return LlavaConfig(vision_config=vision, text_config=text.to_dict())


def _mask_model(config) -> nn.Module:
    """SAM or SAM 2 of `--vision_pretrained`, by its file name, built on the current device."""
    name = Path(config.vision_pretrained).name.lower()
    if "sam2" in name:
        from model.sam2 import build_sam2, sam2_config_from_preset

        size = next((size for marker, size in SAM2_NAMES if marker in name), "hiera_l")
        return build_sam2(sam2_config_from_preset(size))
    from model.sam import build_sam, sam_config_from_preset

    preset = next((n for n in SAM_NAMES if n in name), "vit_h")
    return build_sam(sam_config_from_preset("tiny" if "tiny" in name else preset))


def meta_segmenter(config) -> nn.Module:
    """The segmenter of a TrainConfig on the meta device (no weights; real parameter counts)."""
    from model.backbone import family_of
    from model.lora import apply_lora, set_trainable
    from model.sam import EarlyFusion
    from model.segmenter import Segmenter, build_projector
    from model.tokens import TokenIds

    llava_config = _llava_config(config)
    with torch.device("meta"):
        llava = family_of(llava_config).model_class(llava_config)
        sam = _mask_model(config)
        prompt = sam.config.mask_decoder_config.hidden_size
        projector = build_projector(llava_config.text_config.hidden_size, prompt)
        fusion = (
            EarlyFusion(sam.config.vision_config.hidden_size, prompt)
            if config.early_fusion
            else None
        )
    settings = config.model_config()
    apply_lora(
        llava, config.lora_r, config.lora_alpha, config.lora_dropout, settings.lora_target_modules
    )
    ids = TokenIds(seg=0, rej=0, image=0, pad=0, bos=None, eos=0, im_start=None, im_end=None)
    model = Segmenter(
        llava, sam, projector, ids, early_fusion=fusion, early_layer=None if fusion is None else 0
    )
    set_trainable(model, config.train_mask_decoder, config.train_mm_projector)
    return model


def parameter_counts(model: nn.Module) -> ParameterCounts:
    parameters = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCounts(
        total=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        largest_layer=largest,
    )


def activation_shape(model: nn.Module, config) -> ActivationShape:
    text = model.llava.config.text_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    targets = config.model_config().lora_target_modules
    return ActivationShape(
        hidden_size=text.hidden_size,
        kv_width=text.hidden_size * kv_heads // heads,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        lora_targets=len(targets) if config.lora_r else 0,
        lora_dropout=config.lora_dropout > 0,
        bytes_per_value=config.model_config().dtype.itemsize,
    )


def plan_settings(config, gpus: int, on_gpu: bool = True) -> list[MemoryPlan]:
    """Every (ZeRO stage, offload, checkpointing) setting of the run, the configured first."""
    from model.backbone import image_token_count
    from utils.preprocess import max_image_tokens

    model = meta_segmenter(config)
    counts, shape = parameter_counts(model), activation_shape(model, config)
    conversations = config.batch_size * max(config.num_classes_per_sample, 1)
    image_tokens = image_token_count(model.llava.config) or max_image_tokens(
        config.version, config.max_pixels
    )
    lengths = {
        "planned": min(image_tokens + PLANNED_TEXT_TOKENS, config.model_max_length),
        "max": config.model_max_length,
    }
    runtime = int(RUNTIME_OVERHEAD_GB * GIB) if on_gpu else 0
    configured = (config.zero_stage, config.offload_optimizer, config.gradient_checkpointing)
    settings = [configured] + [
        (stage, offload, checkpointing)
        for stage in (2, 3)
        for offload in (False, True)
        for checkpointing in (True, False)
        if (stage, offload, checkpointing) != configured
    ]
    plans = []
    for stage, offload, checkpointing in settings:
        states = model_state_bytes(counts, stage, offload, gpus, shape.bytes_per_value)
        activations = {}
        for key, length in lengths.items():
            tokens = conversations * length
            # trimmed logits: the answer text is at most the text part of each conversation
            rows = tokens if config.full_logits else conversations * (length - image_tokens)
            pixels = conversations * PLANNED_MASK_PIXELS
            activations[key] = activation_bytes(
                shape,
                tokens,
                max(rows, 0),
                checkpointing,
                target_pixels=pixels,
                output_holds_logits=config.full_logits,
            )
        plans.append(
            MemoryPlan(
                zero_stage=stage,
                offload_optimizer=offload,
                gradient_checkpointing=checkpointing,
                trainable_weights=shape.bytes_per_value * counts.trainable,
                activations=activations["planned"],
                activations_at_max_length=activations["max"],
                runtime=runtime,
                **states,
            )
        )
    return plans


def describe(plans: list[MemoryPlan], card_gb: float) -> str:
    """A table of the settings (GB per GPU) and whether each fits a `card_gb` card."""
    header = (
        f"{'ZeRO':>4} {'offload':>7} {'ckpt':>5} {'weights':>8} {'(train)':>8} {'grads':>7} "
        f"{'optim':>7} {'activ':>7} {'total':>7} {'@max_len':>8}  fits {card_gb:g} GB"
    )
    lines = [header]
    for index, plan in enumerate(plans):
        gb = {k: v / GIB for k, v in asdict(plan).items() if type(v) is int}
        fits = "yes" if plan.total_at_max_length / GIB <= card_gb else (
            "typical only" if plan.total / GIB <= card_gb else "no")  # fmt: skip
        lines.append(
            f"{plan.zero_stage:>4} {plan.offload_optimizer!s:>7} "
            f"{plan.gradient_checkpointing!s:>5} {gb['weights']:8.2f} "
            f"{gb['trainable_weights']:8.2f} {gb['gradients']:7.2f} {gb['optimizer']:7.2f} "
            f"{gb['activations']:7.2f} {plan.total / GIB:7.2f} "
            f"{plan.total_at_max_length / GIB:8.2f}  {fits}"
            + ("  <- configured" if index == 0 else "")
        )
    return "\n".join(lines)


def split_json_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether `--json` was given, the other arguments). `--json` belongs to
    `--estimate_memory` alone and is read here, apart from the shared train_ds.py flags (tools
    that extend those define a `--json` of their own)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--json", action="store_true")
    known, rest = parser.parse_known_args(argv)
    return known.json, rest


def print_memory_plan(config, as_json: bool = False) -> dict:
    """`--estimate_memory`: print the table (or with `as_json` one JSON object: the configured
    setting's parts in GB, "total_gb", and every setting under "settings"). Returns the object."""
    plans = plan_settings(config, config.estimate_gpus)
    result = {
        **plans[0].to_json(),
        "gpus": config.estimate_gpus,
        "gpu_memory_gb": config.gpu_memory_gb,
        "fits": plans[0].total / GIB <= config.gpu_memory_gb,
        "settings": [plan.to_json() for plan in plans],
    }
    if as_json:
        print(json.dumps(result, indent=2), flush=True)
    else:
        print(describe(plans, config.gpu_memory_gb), flush=True)
    return result
