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
  and shapes appear in its patch (multi-label), in the same steps and then (`--clip_steps`)
  alone, as CLIP is far cheaper than SAM and its shape features limit what LLaVA can answer;
- then LLaVA's projector and language model (CLIP frozen), as LLaVA's visual instruction
  tuning does, on conversations in the segmentation run's own template and tokenization: "Which
  of these are in the image: the red circle, the red star, ...?" answered "the red circle: yes,
  the red star: no, ..." (the absent kinds near misses: the colour of one object with the shape
  of another), then "Describe the image from left to right." answered with the objects' list;
  next-token loss on the answers. The questions teach the language model to tell a present kind
  from a near miss, the decision behind `[REJ]`, in the place where GSVA's answers put it: after
  the name, with every name asked before (in another layout, such as bare "name: yes" lines
  after the image, the skill did not carry over to the segmentation run's answers). Several
  names per scene give the dense signal a tiny model needs to leave the chance plateau (one
  question per scene stays at chance for thousands of steps, even over perfect image features).

The scenes are kept as uint8 images and label maps and preprocessed per batch, so a large pool
(20000 scenes, about 20 s to draw) costs little memory and CLIP does not overfit it.
The heads are dropped, and the models are saved back in their own formats (the HF LLaVA
directory, the original-layout SAM checkpoint), so the segmentation run loads them exactly as
it loads real weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from model.backbone import image_token_count
from model.mask_models import load_mask_model
from model.sam import save_sam_checkpoint
from model.tokens import IGNORE_INDEX, TokenIds
from tools.tiny_assets.common import jpeg_round_trip
from tools.tiny_assets.shapes_world import COLOURS, COMPOSITES, OBJECT_SHAPES, Scene, generate_scene
from tools.tiny_assets.shapes_world_text import absent_kind, join_words, plural, with_article
from utils.collate import template_for, tokenize_conversation
from utils.conversation import DEFAULT_CONV_TYPE
from utils.datasets.templates import IMAGE_PREFIX
from utils.preprocess import ImageProcessors, resize_longest_side

KINDS = tuple((colour, shape) for colour in COLOURS for shape in OBJECT_SHAPES)
KIND_INDEX = {kind: index + 1 for index, kind in enumerate(KINDS)}  # 0: background
PARTS = tuple(sorted({part.name for spec in COMPOSITES.values() for part in spec.parts}))
PART_INDEX = {name: index + 1 for index, name in enumerate(PARTS)}  # 0: no part
STREAM_SEED = 7919  # mixed with the asset seed: a scene stream apart from every dataset's
LOG_EVERY = 100
PRESENT_ODDS = 0.5  # of a yes/no question naming a present kind
ARTICLE_ODDS = 0.5  # of "the red circle" over "red circle", as gRefCOCO's expressions vary
QUESTION_FORMS = ("kind", "kind", "colour", "shape")  # drawn uniformly: half of them kinds
# A patch holds few of the many kinds: weighting its present ones keeps CLIP from settling for
# "nothing here" (with a CLIP stage, the pretrained LLaVA's shape answers: 67 % -> 77 % right).
CLIP_POS_WEIGHT = 5.0
HELD_OUT_SCENES = 300  # new scenes on which LLaVA's yes/no accuracy is measured
HELD_OUT_STREAM = 1  # their stream (the pool's is 0)
# Several wordings, one drawn per scene: with a single one, the tiny language model tied its
# answers to that wording (0.90 right on new scenes, 0.72 with the validation's question).
PRESENCE_QUESTIONS = (
    "Which of these are in the image: {names}?",
    "Are these in the image: {names}?",
    "What are {names} in this image?",
    "Can you find {names} in this picture?",
    "Is each of {names} in this image?",
)
CAPTION_QUESTION = "Describe the image from left to right."
NO_TOKEN = -1  # the id of [SEG] and [REJ] in pretraining: none (the segmentation run adds them)
DRAWS_PER_NAME = 4  # tries per wanted name before a scene settles for fewer distinct names
Rounds = list[tuple[str, str]]  # (question, answer) per round of a conversation


@dataclass(frozen=True)
class PretrainOptions:
    """The encoders' `steps` (at `lr`), CLIP's own `clip_steps` (at `lr`; 0: none), then LLaVA's
    `llava_steps` (at `llava_lr`; 0: none), each of `batch_size` scenes drawn with repeats from
    one pool of `pool_size` scenes of width x height pixels holding min_objects..max_objects
    objects; each scene's LLaVA conversation asks about `questions` names (fewest, most)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    pool_size: int = 20000
    width: int = 64
    height: int = 64
    min_objects: int = 2
    max_objects: int = 5
    seed: int = 0
    clip_steps: int = 0
    llava_steps: int = 0
    llava_lr: float = 2e-3
    questions: tuple[int, int] = (4, 18)


@dataclass
class ScenePool:
    """Scenes as drawn, compact: images uint8 [N, H, W, 3] (after the JPEG round trip), kinds
    and parts uint8 [N, H, W] label maps (`label_maps`), and each scene's LLaVA conversation."""

    images: np.ndarray
    kinds: np.ndarray
    parts: np.ndarray
    conversations: list[Rounds]

    def __len__(self) -> int:
        return len(self.conversations)


@dataclass
class SceneBatch:
    """Preprocessed scenes. clip [B, 3, h, w]; sam [B, 3, S, S]; clip_kinds [B, h, w] and
    sam_kinds, sam_parts [B, S, S]: int64 labels (IGNORE_INDEX on SAM's padding)."""

    clip: Tensor
    sam: Tensor
    clip_kinds: Tensor
    sam_kinds: Tensor
    sam_parts: Tensor
    conversations: list[Rounds]


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


def build_pool(options: PretrainOptions, stream: int = 0) -> ScenePool:
    """Draw the scenes of one stream, JPEG-compressed as the dataset's images are, with their
    conversations."""
    rng = np.random.default_rng([options.seed, STREAM_SEED, stream])
    objects = (options.min_objects, options.max_objects)
    images, kinds, parts, conversations = [], [], [], []
    for _ in range(options.pool_size):
        scene = generate_scene(rng, options.width, options.height, objects)
        images.append(jpeg_round_trip(scene.image))
        scene_kinds, scene_parts = label_maps(scene)
        kinds.append(scene_kinds)
        parts.append(scene_parts)
        conversations.append(scene_rounds(scene, rng, options.questions))
    return ScenePool(np.stack(images), np.stack(kinds), np.stack(parts), conversations)


@dataclass(frozen=True)
class Batches:
    """The pool's scenes preprocessed as the models' inputs, a batch at a time."""

    pool: ScenePool
    processors: ImageProcessors

    def __len__(self) -> int:
        return len(self.pool)

    def __call__(self, indexes: Tensor) -> SceneBatch:
        """The scenes at `indexes` (int64 [B])."""
        pool, processors = self.pool, self.processors
        clip, sam, clip_kinds, sam_kinds, sam_parts = [], [], [], [], []
        for index in indexes.tolist():
            image = processors(pool.images[index])
            clip.append(image.vision)
            sam.append(image.sam)
            kinds = processors.clip.resize_and_crop(pool.kinds[index], Image.Resampling.NEAREST)
            clip_kinds.append(torch.from_numpy(kinds.astype(np.int64)))
            sam_kinds.append(sam_labels(pool.kinds[index], processors.sam.image_size))
            sam_parts.append(sam_labels(pool.parts[index], processors.sam.image_size))
        return SceneBatch(
            torch.stack(clip),
            torch.stack(sam),
            torch.stack(clip_kinds),
            torch.stack(sam_kinds),
            torch.stack(sam_parts),
            [pool.conversations[i] for i in indexes.tolist()],
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

    def forward(self, batch: SceneBatch) -> dict[str, Tensor]:
        """The three losses (token multi-label BCE, per-pixel kind and part CE)."""
        kinds, parts = self.sam_head(self.sam(batch.sam).last_hidden_state)
        return {
            **self.clip_losses(batch),
            "sam_kinds": F.cross_entropy(kinds, batch.sam_kinds, ignore_index=IGNORE_INDEX),
            "sam_parts": F.cross_entropy(parts, batch.sam_parts, ignore_index=IGNORE_INDEX),
        }

    def clip_losses(self, batch: SceneBatch) -> dict[str, Tensor]:
        """CLIP's token multi-label BCE, the present labels weighted CLIP_POS_WEIGHT times."""
        hidden = self.clip(batch.clip, output_hidden_states=True).hidden_states
        token_logits = self.clip_head(hidden[self.feature_layer][:, 1:])  # CLS dropped
        targets = token_targets(batch.clip_kinds, self.clip.config.patch_size)
        weight = torch.full(targets.shape[-1:], CLIP_POS_WEIGHT)
        loss = F.binary_cross_entropy_with_logits(token_logits, targets, pos_weight=weight)
        return {"clip_tokens": loss}

    def clip_parameters(self) -> list[nn.Parameter]:
        return [*self.clip.parameters(), *self.clip_head.parameters()]


def scene_rounds(scene: Scene, rng: np.random.Generator, counts: tuple[int, int]) -> Rounds:
    """LLaVA's pretraining conversation about a scene, in the LLaVA instruction-tuning form the
    segmentation run uses: "<image>\\nWhich of these are in the image: a, b, c?" (or another of
    PRESENCE_QUESTIONS) answered "a: yes, b: no, c: yes." (`counts`: fewest and most names,
    inclusive), then a request for the caption. The names come before their answers, as in
    GSVA's questions and answers."""
    count = int(rng.integers(counts[0], counts[1] + 1))
    asked: dict[str, bool] = {}  # distinct names, as a gRefCOCO image's expressions are
    for _ in range(count * DRAWS_PER_NAME):
        if len(asked) == count:
            break
        name, present = question(scene, rng)
        asked.setdefault(name, present)
    names = ", ".join(asked)
    answers = ", ".join(f"{name}: {'yes' if present else 'no'}" for name, present in asked.items())
    return [
        (IMAGE_PREFIX + _pick(rng, PRESENCE_QUESTIONS).format(names=names), answers + "."),
        (CAPTION_QUESTION, caption(scene)),
    ]


def caption(scene: Scene) -> str:
    """'From left to right: a red circle, a blue star and a green house.'"""
    objects = sorted(scene.objects, key=lambda obj: obj.centre[0])
    return "From left to right: " + join_words([with_article(o.name) for o in objects]) + "."


def question(scene: Scene, rng: np.random.Generator) -> tuple[str, bool]:
    """A name and whether the scene holds it, present or absent with even odds: a kind
    ("the red circle"; absent: a near miss, `absent_kind`) or, as gRefCOCO's groups name them,
    a colour ("the red things") or a shape ("the circles"). Colours and shapes are the easier
    questions that start the language model reading the image tokens; kinds need both bound."""
    present = bool(rng.random() < PRESENT_ODDS)
    form = QUESTION_FORMS[int(rng.integers(len(QUESTION_FORMS)))]
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if form == "colour":
        colours = {o.colour for o in scene.objects}
        colour = obj.colour if present else _pick(rng, [c for c in COLOURS if c not in colours])
        return f"the {colour} things", present
    if form == "shape":
        shapes = {o.shape for o in scene.objects}
        shape = obj.shape if present else _pick(rng, [s for s in OBJECT_SHAPES if s not in shapes])
        return f"the {plural(shape)}", present
    if present:
        name = obj.name
    else:
        shape, colour = absent_kind(scene, rng)
        name = f"{colour} {shape}"
    return ("the " if rng.random() < ARTICLE_ODDS else "") + name, present


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def conversation_batch(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Rounds],
    image_tokens: int,
    image_id: int,
) -> dict[str, Tensor]:
    """input_ids, attention_mask, labels [B, L] (right-padded): the conversations rendered with
    LLaVA's template and tokenized as the segmentation run does (`tokenize_conversation`:
    `<image>` expanded to `image_tokens` ids, the loss on the answers and their EOS only)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    token_ids = TokenIds(
        seg=NO_TOKEN,
        rej=NO_TOKEN,
        image=image_id,
        pad=pad,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        im_start=None,
        im_end=None,
    )
    template = template_for(tokenizer, DEFAULT_CONV_TYPE)
    encoded = [
        tokenize_conversation(rounds, tokenizer, token_ids, image_tokens, template)
        for rounds in conversations
    ]
    ids = [row_ids for row_ids, _ in encoded]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad),
        "attention_mask": pad_sequence(
            [torch.ones_like(row_ids) for row_ids in ids], batch_first=True, padding_value=0
        ),
        "labels": pad_sequence(
            [labels for _, labels in encoded], batch_first=True, padding_value=IGNORE_INDEX
        ),
    }


def pretrain_llava(
    llava: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    batches: Batches,
    options: PretrainOptions,
) -> list[dict[str, float]]:
    """LLaVA's own pretraining in small: the projector and the language model (CLIP frozen)
    learn to answer whether named kinds are in the image and to caption it, listing its
    objects from left to right (`scene_text`). Returns the losses per step."""
    llava.model.vision_tower.requires_grad_(False)
    trained = [p for n, p in llava.named_parameters() if not n.startswith("model.vision_tower.")]

    def losses(batch: SceneBatch) -> dict[str, Tensor]:
        return {"llava": llava(**llava_inputs(llava, tokenizer, batch)).loss}

    llava.train()
    return run_steps(
        "LLaVA", trained, losses, batches, options.llava_steps, options.llava_lr, options
    )


def llava_inputs(
    llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, batch: SceneBatch
) -> dict[str, Tensor]:
    """The batch's images and conversations as LLaVA's keyword arguments
    (`conversation_batch` plus pixel_values)."""
    image_tokens = image_token_count(llava.config)
    image_id = llava.config.image_token_index
    texts = conversation_batch(tokenizer, batch.conversations, image_tokens, image_id)
    return {"pixel_values": batch.clip, **texts}


@torch.no_grad()
def yes_no_accuracy(
    llava: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, batch: SceneBatch
) -> float:
    """Teacher-forced accuracy of LLaVA's yes/no answers in the batch's texts: at each answer,
    is "yes" or "no" the likelier next token, as the text says?"""
    yes, no = (answer_token(tokenizer, word) for word in ("yes", "no"))
    inputs = llava_inputs(llava, tokenizer, batch)
    logits = llava(**inputs).logits[:, :-1]
    targets = inputs["labels"][:, 1:]
    asked = (targets == yes) | (targets == no)
    said_yes = logits[..., yes] > logits[..., no]
    return (said_yes[asked] == (targets[asked] == yes)).float().mean().item()


def answer_token(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """The id of the first token of `word` after ": " (how `scene_rounds` writes answers)."""
    with_word = tokenizer("the circle: " + word, add_special_tokens=False).input_ids
    without = tokenizer("the circle:", add_special_tokens=False).input_ids
    if with_word[: len(without)] != without:
        raise ValueError(f"the tokenizer splits ': {word}' across the colon")
    return with_word[len(without)]


def run_steps(
    name: str,
    parameters: list[nn.Parameter],
    losses_of: Callable[[SceneBatch], dict[str, Tensor]],
    batches: Batches,
    steps: int,
    lr: float,
    options: PretrainOptions,
) -> list[dict[str, float]]:
    """`steps` AdamW steps (one-cycle schedule) on the sum of `losses_of(batch)`, each batch
    `options.batch_size` scenes of `batches` drawn with repeats. Returns the losses per step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(options.seed)
    history: list[dict[str, float]] = []
    for step in range(steps):
        indexes = torch.randint(len(batches), (options.batch_size,), generator=generator)
        losses = losses_of(batches(indexes))
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
    docstring). Returns the mean losses of the first and last LOG_EVERY steps of each and, with
    LLaVA's stage, its yes/no accuracy on HELD_OUT_SCENES new scenes before and after."""
    llava = LlavaForConditionalGeneration.from_pretrained(llava_directory)
    sam = load_mask_model(sam_path)
    processors = ImageProcessors.from_pretrained(
        llava_directory, sam.config.vision_config.image_size
    )
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    batches = Batches(build_pool(options), processors)
    print(f"pretraining: {options.pool_size} scenes in {time.perf_counter() - start:.0f} s")

    encoders = Encoders(llava, sam).train()
    params = list(encoders.parameters())
    summary = _ends(
        run_steps("encoder", params, encoders, batches, options.steps, options.lr, options)
    )
    if options.clip_steps > 0:
        clip_history = run_steps(
            "CLIP",
            encoders.clip_parameters(),
            encoders.clip_losses,
            batches,
            options.clip_steps,
            options.lr,
            options,
        )
        summary |= {f"clip_stage_{k}": v for k, v in _ends(clip_history).items()}
    if options.llava_steps > 0:
        tokenizer = AutoTokenizer.from_pretrained(llava_directory)
        held_out = build_pool(replace(options, pool_size=HELD_OUT_SCENES), stream=HELD_OUT_STREAM)
        held_out_batch = Batches(held_out, processors)(torch.arange(HELD_OUT_SCENES))
        summary["yes_no_accuracy_before"] = yes_no_accuracy(llava.eval(), tokenizer, held_out_batch)
        summary |= _ends(pretrain_llava(llava, tokenizer, batches, options))
        summary["yes_no_accuracy"] = yes_no_accuracy(llava.eval(), tokenizer, held_out_batch)
        print(
            f"LLaVA yes/no accuracy on {HELD_OUT_SCENES} new scenes: "
            f"{summary['yes_no_accuracy_before']:.3f} -> {summary['yes_no_accuracy']:.3f}"
        )
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
