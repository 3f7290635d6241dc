"""A short pretraining of the demo's tiny models, so that they start where real ones do.

A real run starts from a CLIP and a SAM pretrained on millions of images, whose features already
say what is where, and from a LLaVA that can already describe an image. Random tiny models know
none of it, and a segmentation run cannot teach its frozen encoders (LISA freezes both). So the
demo assets (`make_tiny_assets.py --pretrain_steps N --llava_steps M`) pretrain the tiny models
on shapes-world scenes from a random stream of their own (never the dataset's images):

- SAM's image encoder: per pixel, the kind (colour, shape) of the object there and its part
  name. A 1x1 convolution maps the image embedding [B, D, g, g] to p*p sub-pixel logits per grid
  cell (p = S / g), pixel-shuffled to [B, classes, S, S];
- CLIP's image tokens (the layer LLaVA's projector reads): for each token, which kinds, colours
  and shapes appear in its patch (multi-label);
- then LLaVA's projector and language model (CLIP frozen), as LLaVA's own pretraining does
  with captions: the image tokens followed by a caption listing the objects from left to
  right, next-token loss on the caption.

The heads are dropped, and the models are saved back in their own formats (the HF LLaVA
directory, the original-layout SAM checkpoint), so the segmentation run loads them exactly as
it loads real weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoTokenizer, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from model.backbone import image_token_count
from model.sam import load_sam_checkpoint, save_sam_checkpoint
from tools.tiny_assets.common import jpeg_round_trip
from utils.preprocess import ImageProcessors, resize_longest_side
from utils.shapes_world import COLOURS, COMPOSITES, OBJECT_SHAPES, Scene, generate_scene
from utils.shapes_world_text import join_words, with_article

KINDS = tuple((colour, shape) for colour in COLOURS for shape in OBJECT_SHAPES)
KIND_INDEX = {kind: index + 1 for index, kind in enumerate(KINDS)}  # 0: background
PARTS = tuple(sorted({part.name for spec in COMPOSITES.values() for part in spec.parts}))
PART_INDEX = {name: index + 1 for index, name in enumerate(PARTS)}  # 0: no part
IGNORE_INDEX = -100
STREAM_SEED = 7919  # mixed with the asset seed: a scene stream apart from every dataset's
LOG_EVERY = 100
TENSOR_FIELDS = ("clip", "sam", "clip_kinds", "sam_kinds", "sam_parts")


@dataclass(frozen=True)
class PretrainOptions:
    """The encoders' `steps` (at `lr`) and then LLaVA's `llava_steps` (at `llava_lr`; 0: none),
    each of `batch_size` scenes drawn with repeats from one pool of `pool_size` scenes of
    width x height pixels holding min_objects..max_objects objects."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    pool_size: int = 3000
    width: int = 64
    height: int = 64
    min_objects: int = 2
    max_objects: int = 5
    seed: int = 0
    llava_steps: int = 0
    llava_lr: float = 1e-3


@dataclass
class ScenePool:
    """Preprocessed scenes. clip [N, 3, h, w]; sam [N, 3, S, S]; clip_kinds [N, h, w] and
    sam_kinds, sam_parts [N, S, S]: int64 labels (IGNORE_INDEX on SAM's padding)."""

    clip: Tensor
    sam: Tensor
    clip_kinds: Tensor
    sam_kinds: Tensor
    sam_parts: Tensor
    texts: list[str]  # captions


def label_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W] maps: the kind index of the object at each pixel, and its part index."""
    kinds = np.zeros(scene.size, dtype=np.uint8)
    parts = np.zeros(scene.size, dtype=np.uint8)
    for obj in scene.objects:
        kinds[obj.mask] = KIND_INDEX[(obj.colour, obj.shape)]
        for part in obj.parts:
            parts[part.mask] = PART_INDEX[part.name]
    return kinds, parts


def sam_labels(labels: np.ndarray, image_size: int) -> Tensor:
    """uint8 [H, W] -> int64 [S, S]: resized as SamTransform resizes the image (nearest), padded
    with IGNORE_INDEX."""
    height, width = resize_longest_side(*labels.shape, image_size)
    resized = np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))
    out = torch.full((image_size, image_size), IGNORE_INDEX, dtype=torch.int64)
    out[:height, :width] = torch.from_numpy(resized.astype(np.int64))
    return out


def build_pool(options: PretrainOptions, processors: ImageProcessors) -> ScenePool:
    """Draw, JPEG-compress (as the dataset's images are) and preprocess the scenes."""
    rng = np.random.default_rng([options.seed, STREAM_SEED])
    objects = (options.min_objects, options.max_objects)
    clip, sam, clip_kinds, sam_kinds, sam_parts, texts = [], [], [], [], [], []
    for _ in range(options.pool_size):
        scene = generate_scene(rng, options.width, options.height, objects)
        clip_pixels, sam_pixels, _ = processors(jpeg_round_trip(scene.image))
        kinds, parts = label_maps(scene)
        clip.append(clip_pixels)
        sam.append(sam_pixels)
        clip_kinds.append(torch.from_numpy(processors.clip.resize_and_crop(kinds, Image.NEAREST)))
        sam_kinds.append(sam_labels(kinds, processors.sam.image_size))
        sam_parts.append(sam_labels(parts, processors.sam.image_size))
        texts.append(caption(scene))
    return ScenePool(
        torch.stack(clip),
        torch.stack(sam),
        torch.stack(clip_kinds).long(),
        torch.stack(sam_kinds),
        torch.stack(sam_parts),
        texts,
    )


def kind_attributes() -> Tensor:
    """float [len(KINDS), colours + shapes]: each kind's colour and shape as a two-hot row."""
    rows = torch.zeros(len(KINDS), len(COLOURS) + len(OBJECT_SHAPES))
    for index, (colour, shape) in enumerate(KINDS):
        rows[index, COLOURS.index(colour)] = 1
        rows[index, len(COLOURS) + OBJECT_SHAPES.index(shape)] = 1
    return rows


def token_targets(kinds: Tensor, patch: int) -> Tensor:
    """int64 [B, h, w] kind labels -> float [B, T, kinds + colours + shapes] multi-hot per patch
    (T = (h / patch) * (w / patch), row-major as CLIP orders its tokens)."""
    one_hot = F.one_hot(kinds, len(KINDS) + 1).permute(0, 3, 1, 2).float()
    present = F.max_pool2d(one_hot, patch)[:, 1:].flatten(2).transpose(1, 2)  # [B, T, K]
    attributes = (present @ kind_attributes()).clamp(max=1)
    return torch.cat([present, attributes], dim=-1)


class SamHead(nn.Module):
    """Image embedding [B, D, g, g] -> (kind logits, part logits), each [B, classes, S, S]."""

    def __init__(self, width: int, upscale: int) -> None:
        super().__init__()
        self.classes = (len(KINDS) + 1, len(PARTS) + 1)
        self.upscale = upscale
        self.conv = nn.Conv2d(width, sum(self.classes) * upscale**2, kernel_size=1)

    def forward(self, embedding: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.pixel_shuffle(self.conv(embedding), self.upscale)
        kinds, parts = logits.split(self.classes, dim=1)
        return kinds, parts


class Encoders(nn.Module):
    """CLIP's vision tower and SAM's image encoder with their pretraining heads."""

    def __init__(self, llava: LlavaForConditionalGeneration, sam: nn.Module) -> None:
        super().__init__()
        self.clip = llava.model.vision_tower
        self.feature_layer = llava.config.vision_feature_layer
        self.sam = sam.vision_encoder
        clip_width = llava.config.vision_config.hidden_size
        self.clip_head = nn.Linear(clip_width, len(KINDS) + len(COLOURS) + len(OBJECT_SHAPES))
        sam_config = sam.config.vision_config
        # one grid cell covers patch_size x patch_size input pixels
        self.sam_head = SamHead(sam_config.output_channels, sam_config.patch_size)

    def forward(self, batch: ScenePool) -> dict[str, Tensor]:
        """The three losses (token multi-label BCE, per-pixel kind and part CE)."""
        hidden = self.clip(batch.clip, output_hidden_states=True).hidden_states
        token_logits = self.clip_head(hidden[self.feature_layer][:, 1:])  # CLS dropped
        patch = self.clip.config.patch_size
        kinds, parts = self.sam_head(self.sam(batch.sam).last_hidden_state)
        return {
            "clip_tokens": F.binary_cross_entropy_with_logits(
                token_logits, token_targets(batch.clip_kinds, patch)
            ),
            "sam_kinds": F.cross_entropy(kinds, batch.sam_kinds, ignore_index=IGNORE_INDEX),
            "sam_parts": F.cross_entropy(parts, batch.sam_parts, ignore_index=IGNORE_INDEX),
        }


def sample(pool: ScenePool, indexes: Tensor) -> ScenePool:
    """The pool's scenes at `indexes` (int64 [B]) as a smaller pool: one batch."""
    tensors = [getattr(pool, name)[indexes] for name in TENSOR_FIELDS]
    return ScenePool(*tensors, [pool.texts[i] for i in indexes.tolist()])


def caption(scene: Scene) -> str:
    """'From left to right: a red circle, a blue star and a green house.'"""
    objects = sorted(scene.objects, key=lambda obj: obj.centre[0])
    return "From left to right: " + join_words([with_article(o.name) for o in objects]) + "."


def text_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], image_tokens: int, image_id: int
) -> dict[str, Tensor]:
    """input_ids, attention_mask, labels [B, L]: <s>, the image tokens, the text, </s>
    (right-padded; the loss only on the text and </s>)."""
    texts = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    prefix = [tokenizer.bos_token_id] + [image_id] * image_tokens
    length = len(prefix) + max(len(ids) for ids in texts) + 1
    input_ids = torch.full((len(texts), length), tokenizer.pad_token_id or 0)
    labels = torch.full((len(texts), length), IGNORE_INDEX)
    attention_mask = torch.zeros(len(texts), length, dtype=torch.int64)
    for row, ids in enumerate(texts):
        answer = torch.tensor([*ids, tokenizer.eos_token_id])
        end = len(prefix) + len(answer)
        input_ids[row, :end] = torch.cat([torch.tensor(prefix), answer])
        labels[row, len(prefix) : end] = answer
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain_llava(
    llava: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    pool: ScenePool,
    options: PretrainOptions,
) -> list[dict[str, float]]:
    """LLaVA's own pretraining in small: the projector and the language model (CLIP frozen)
    learn to caption the image, listing its objects from left to right. Returns the losses
    per step."""
    image_tokens = image_token_count(llava.config)
    llava.model.vision_tower.requires_grad_(False)
    trained = [p for n, p in llava.named_parameters() if not n.startswith("model.vision_tower.")]

    def losses(batch: ScenePool) -> dict[str, Tensor]:
        inputs = text_batch(tokenizer, batch.texts, image_tokens, llava.config.image_token_index)
        return {"llava": llava(pixel_values=batch.clip, **inputs).loss}

    llava.train()
    return run_steps("LLaVA", trained, losses, pool, options.llava_steps, options.llava_lr, options)


def run_steps(
    name: str,
    parameters: list[nn.Parameter],
    losses_of: Callable[[ScenePool], dict[str, Tensor]],
    pool: ScenePool,
    steps: int,
    lr: float,
    options: PretrainOptions,
) -> list[dict[str, float]]:
    """`steps` AdamW steps (one-cycle schedule) on the sum of `losses_of(batch)`, batches drawn
    from the pool. Returns the losses per step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(options.seed)
    history: list[dict[str, float]] = []
    for step in range(steps):
        indexes = torch.randint(len(pool.texts), (options.batch_size,), generator=generator)
        losses = losses_of(sample(pool, indexes))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
        history.append({key: loss.item() for key, loss in losses.items()})
        if (step + 1) % LOG_EVERY == 0:
            recent = {k: round(v, 3) for k, v in _mean(history[-LOG_EVERY:]).items()}
            print(f"{name} pretraining step {step + 1}/{steps}: {recent}", flush=True)
    return history


def pretrain_tiny_models(
    llava_directory: str | Path, sam_path: str | Path, options: PretrainOptions
) -> dict[str, float]:
    """Pretrain the LLaVA directory's CLIP and the SAM checkpoint's image encoder, then (with
    `options.llava_steps`) the LLaVA's projector and language model, in place (see the module
    docstring). Returns the mean losses of the first and last LOG_EVERY steps of each."""
    llava = LlavaForConditionalGeneration.from_pretrained(llava_directory)
    sam = load_sam_checkpoint(sam_path)
    sam_size = sam.config.vision_config.image_size
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    pool = build_pool(options, ImageProcessors.from_pretrained(llava_directory, sam_size))
    print(f"pretraining: {options.pool_size} scenes in {time.perf_counter() - start:.0f} s")
    encoders = Encoders(llava, sam).train()
    params = list(encoders.parameters())
    summary = _ends(
        run_steps("encoder", params, encoders, pool, options.steps, options.lr, options)
    )
    if options.llava_steps > 0:
        tokenizer = AutoTokenizer.from_pretrained(llava_directory)
        summary |= _ends(pretrain_llava(llava, tokenizer, pool, options))
    llava.eval().save_pretrained(llava_directory)
    save_sam_checkpoint(sam.eval(), sam_path)
    return {**summary, "seconds": time.perf_counter() - start}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}


def _ends(rows: list[dict[str, float]]) -> dict[str, float]:
    """{first_<loss>, last_<loss>}: mean losses of the first and last LOG_EVERY steps (of the
    first and second half when there are fewer)."""
    window = max(1, min(LOG_EVERY, len(rows) // 2))
    first = {f"first_{k}": v for k, v in _mean(rows[:window]).items()}
    return first | {f"last_{k}": v for k, v in _mean(rows[-window:]).items()}
