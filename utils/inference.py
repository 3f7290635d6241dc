"""Inference on images and free-form questions (chat.py, batch mode, and a Python API).

    segmenter = Segmentation.load("runs/merged", precision="bf16", device="cuda")
    answers = segmenter.answer([("photo.jpg", "Where is the cat? Please output a mask.")])
    answers[0].text, answers[0].targets[0].mask   # bool [H, W], or None for a [REJ]

`save_answer` writes, for each generated `[SEG]`, a mask PNG (0/255) and an overlay PNG (the mask
drawn over the image and labelled with its index); a `[REJ]` is reported as not present.
`overlay_targets` draws every mask of an answer in its own colour (the web demo, app.py), and
`target_phrases` reads the phrase naming each target from the answer's text.

Prompts are written with the canonical `[SEG]`/`[REJ]` markers and tokenized in the model's
vocabulary (`utils.collate.model_rounds`); answers are decoded with the vocabulary's strings
(LaSagnA's "wall<ins>sky<no_ins>"), and targets come from the generated token ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from model.backbone import family_of, image_token_count
from model.builder import ModelConfig, build_segmenter
from model.checkpoint import read_segmenter_config
from model.generate import generate
from model.layouts import Layout, detect_layout, image_settings_directory
from model.segmenter import Segmenter
from model.tokens import IGNORE_INDEX, VOCABULARIES
from utils.collate import (
    ProcessedSample,
    check_conv_type,
    collate,
    template_for,
    tokenize_prompt,
)
from utils.datasets.base import IMAGE_PLACEHOLDER, read_image
from utils.generative_eval import linked_coarse
from utils.preprocess import ImageProcessors

MASK_THRESHOLD = 0.0
CORES_CONV_TYPE = "llava_v1_cores"  # utils.conversation: CoReS's system prompt and example
OVERLAY_ALPHA = 0.5
OVERLAY_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 96, 255), (255, 200, 0), (200, 64, 255))
OVERLAY_COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple")
ARRAY_IMAGE_NAME = "<array>"  # Answer.image_path of an image given as an array
# the seg/rej tokens of every vocabulary (decoded answers show the model's own)
TARGET_TOKENS = re.compile(
    "(" + "|".join(re.escape(t) for v in VOCABULARIES.values() for t in (v.seg, v.rej)) + ")"
)
CLAUSE_END = re.compile(r"[,.;!?]")
# the answer templates' words around a target's name (LISA, GSVA, MMR; REFERENCE.md), so that
# "Sure, the mask of the red circle is [SEG]" names "the red circle"
PHRASE_PREFIXES = re.compile(
    r"^(and\b\s*|sure |it is |they are |the segmentation results? (is |are |of )?|the mask of |"
    r"the segmentation of |the referred )+",
    re.IGNORECASE,
)
PHRASE_SUFFIXES = re.compile(r"(\s*:|\s+is|\s+are)$", re.IGNORECASE)
LABEL_SCALE_PER_PIXEL = 1 / 400
MIN_LABEL_SCALE = 0.4
FOREGROUND = 255


@dataclass
class Target:
    """One `[SEG]` or `[REJ]` of an answer, in the order generated.

    present: False for `[REJ]` ("the named target is not in the image").
    mask: bool [H, W] at the image's size (None when not present). score: SAM's predicted IoU.
    coarse: with chained decoding (`--chain_token`, CoReS's `[SEG_SEMA]`), the bool [H, W] mask
        of the chain token that prompted this target's mask; None otherwise.
    """

    index: int
    present: bool
    mask: np.ndarray | None
    score: float | None
    coarse: np.ndarray | None = None


@dataclass
class Answer:
    """The model's answer to one (image, prompt): its text and its targets in order."""

    image_path: str
    prompt: str
    text: str
    targets: list[Target]


def device_default() -> str:
    """The accelerator when one is visible, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def question_text(prompt: str) -> str:
    """The user turn: the image placeholder first (as in training) unless the prompt has it."""
    return prompt if IMAGE_PLACEHOLDER in prompt else f"{IMAGE_PLACEHOLDER}\n{prompt}"


@dataclass
class Segmentation:
    """A loaded segmenter with what it needs to turn (image, prompt) pairs into answers."""

    model: Segmenter
    tokenizer: object
    images: ImageProcessors
    conv_type: str
    device: str
    dtype: torch.dtype

    @classmethod
    def load(
        cls,
        version: str,
        precision: str = "bf16",
        device: str | None = None,
        conv_type: str | None = None,
        vision_pretrained: str = "",
        vision_tower: str | None = None,
    ) -> Segmentation:
        """Build from a merged checkpoint (or a LLaVA directory plus `vision_pretrained`).

        conv_type: the template of training; read from the checkpoint when not given.
        vision_tower: the CLIP directory, needed only by the legacy layouts (LLaVA-v1, LISA).
        """
        config = ModelConfig(
            version=version,
            vision_pretrained=vision_pretrained,
            vision_tower=vision_tower,
            precision=precision,
            gradient_checkpointing=False,
            lora_r=0,
        )
        layout = detect_layout(version)
        saved = read_segmenter_config(version) if layout is Layout.MERGED else None
        model, tokenizer = build_segmenter(config, layout)
        device = device or device_default()
        model = model.to(device).eval()
        conv_type = conv_type or (saved.conv_type if saved else published_conv_type(model))
        check_conv_type(model, conv_type)
        images = ImageProcessors.from_pretrained(
            image_settings_directory(version, vision_tower, layout),
            model.sam_input_size,
            mask_model=model.mask_kind.name,
        )
        return cls(model, tokenizer, images, conv_type, device, config.dtype)

    @property
    def max_length(self) -> int:
        """Tokens the language model reads at most (prompt, image tokens and answer together)."""
        return self.model.llava.config.text_config.max_position_embeddings

    def prompt_ids(self, prompt: str, image_tokens: int | None = None) -> torch.Tensor:
        """int64 [L]: the generation prompt's ids, the image placeholder expanded to
        `image_tokens` tokens; when None, the model's fixed count (LLaVA) or the most one image
        can take (Qwen-VL, whose count follows the image)."""
        if image_tokens is None:
            image_tokens = image_token_count(self.model.llava.config) or self.images.max_tokens
        return tokenize_prompt(
            [(question_text(prompt), None)],
            self.tokenizer,
            self.model.token_ids,
            image_tokens,
            template_for(self.tokenizer, self.conv_type),
        )

    def prepare(self, image_path: str | Path | np.ndarray, prompt: str) -> ProcessedSample:
        """One generation prompt with its image (a file, or uint8 RGB [H, W, 3]), for `collate`."""
        image = image_path if isinstance(image_path, np.ndarray) else read_image(image_path)
        processed = self.images(image)
        input_ids = self.prompt_ids(prompt, processed.tokens)
        return ProcessedSample(
            clip_pixels=processed.vision,
            sam_pixels=processed.sam,
            resized_size=processed.resized_size,
            image_grid=processed.grid,
            original_size=tuple(image.shape[:2]),
            input_ids=[input_ids],
            labels=[torch.full_like(input_ids, IGNORE_INDEX)],
            masks=torch.zeros(0, *image.shape[:2], dtype=torch.uint8),
            image_path=image_name(image_path),
            source="inference",
        )

    def answer(
        self, requests: list[tuple[str | Path | np.ndarray, str]], max_new_tokens: int = 512
    ) -> list[Answer]:
        """Answers to (image, prompt) pairs, generated together as one batch (an image is a
        file or a uint8 RGB [H, W, 3] array)."""
        samples = [self.prepare(image, prompt) for image, prompt in requests]
        batch = replace(collate(samples, self.model.token_ids.pad), labels=None, gt_masks=None)
        generation = generate(self.model, batch.to(self.device, self.dtype), max_new_tokens)
        answers = []
        for index, (image, prompt) in enumerate(requests):
            tokens = generation.sequences[index].tolist()
            if tokens and tokens[-1] == self.model.token_ids.eos:
                tokens = tokens[:-1]
            coarse = linked_coarse(generation.coarse_masks[index], generation.coarse_source[index])
            targets = [
                Target(
                    index=slot,
                    present=not bool(is_rej),
                    mask=None if is_rej else binary(logits),
                    score=None if is_rej else float(score),
                    coarse=None if chained is None else binary(chained),
                )
                for slot, (is_rej, logits, score, chained) in enumerate(
                    zip(
                        generation.target_is_rej[index],
                        generation.pred_masks[index],
                        generation.mask_scores[index],
                        coarse,
                        strict=True,
                    )
                )
            ]
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            answers.append(Answer(image_name(image), prompt, text.strip(), targets))
        return answers


def published_conv_type(model: Segmenter) -> str:
    """The template a directory without our segmenter config was trained with: CoReS's, with
    its in-context example, when it has a chain token, else its backbone family's chat format
    (LLaVA-v1's for the LISA family)."""
    if model.token_ids.chain is not None:
        return CORES_CONV_TYPE
    return family_of(model.llava.config).conv_type


def binary(logits: torch.Tensor) -> np.ndarray:
    """Mask logits [H, W] -> bool [H, W] (logit > MASK_THRESHOLD)."""
    return (logits > MASK_THRESHOLD).cpu().numpy()


def image_name(image: str | Path | np.ndarray) -> str:
    """The `image_path` recorded for an image given as a file or as an array."""
    return ARRAY_IMAGE_NAME if isinstance(image, np.ndarray) else str(image)


def overlay_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of target `index` (the colours repeat after len(OVERLAY_COLOURS))."""
    return OVERLAY_COLOURS[index % len(OVERLAY_COLOURS)]


def overlay_colour_name(index: int) -> str:
    return OVERLAY_COLOUR_NAMES[index % len(OVERLAY_COLOUR_NAMES)]


def tint(image: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] with `mask` (bool [H, W]) tinted and outlined in target `index`'s
    colour; pixels outside the mask are unchanged (the outline lies on the mask's border)."""
    colour = np.array(overlay_colour(index), dtype=np.float32)
    drawn = image.astype(np.float32)
    drawn[mask] = (1 - OVERLAY_ALPHA) * drawn[mask] + OVERLAY_ALPHA * colour
    drawn = drawn.astype(np.uint8)
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(drawn, contours, -1, tuple(int(c) for c in colour), 1)
    return drawn


def overlay_targets(image: np.ndarray, targets: list[Target]) -> np.ndarray:
    """uint8 RGB [H, W, 3]: every present target's mask tinted in its own colour, in order (a
    later mask is drawn over an earlier one where they overlap); no text on the image."""
    drawn = image
    for target in targets:
        if target.present:
            drawn = tint(drawn, target.mask, target.index)
    return drawn.copy()


def target_phrases(text: str) -> list[str]:
    """The phrase naming each `[SEG]`/`[REJ]` (or another vocabulary's seg/rej token, e.g.
    `<ins>`) of an answer, in order ("" when the answer gives none, as in "Sure, [SEG]."): the
    clause before the token without the template's words.

    "Sure, the mask of the red circle is [SEG], blue square:[REJ]." -> ["the red circle",
    "blue square"].
    """
    pieces = TARGET_TOKENS.split(text)  # text, token, text, token, ..., text
    phrases = []
    for before in pieces[0:-1:2]:
        clause = CLAUSE_END.split(before)[-1].strip()
        clause = PHRASE_SUFFIXES.sub("", PHRASE_PREFIXES.sub("", clause)).strip()
        phrases.append(clause)
    return phrases


def overlay(image: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] with `mask` (bool [H, W]) tinted, outlined and labelled `index`."""
    drawn = tint(image, mask, index)
    scale = max(MIN_LABEL_SCALE, max(image.shape[:2]) * LABEL_SCALE_PER_PIXEL)
    rows, columns = np.nonzero(mask)
    where = (int(columns.mean()), int(rows.mean())) if len(rows) else (2, int(12 * scale) + 2)
    cv2.putText(
        drawn, str(index), where, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
    )
    return drawn


def save_mask(
    image: np.ndarray, mask: np.ndarray, index: int, directory: Path, name: str
) -> dict[str, object]:
    """Write `<name>_mask_<index>.png` (0/255) and `<name>_overlay_<index>.png`; returns their
    paths and the mask's area in pixels."""
    mask_path = directory / f"{name}_mask_{index}.png"
    overlay_path = directory / f"{name}_overlay_{index}.png"
    cv2.imwrite(str(mask_path), mask.astype(np.uint8) * FOREGROUND)
    drawn = overlay(image, mask, index)
    cv2.imwrite(str(overlay_path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    return {"mask": str(mask_path), "overlay": str(overlay_path), "area": int(mask.sum())}


def save_answer(answer: Answer, directory: str | Path, stem: str) -> dict:
    """Write `<stem>_mask_<i>.png` and `<stem>_overlay_<i>.png` per present target under
    `directory`, and with chained decoding `<stem>_coarse_mask_<i>.png` and
    `<stem>_coarse_overlay_<i>.png` for the chain token's mask that prompted target i; returns
    the JSON record (text, and per target its files, score and a "coarse" entry)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image = read_image(answer.image_path)
    records = []
    for target in answer.targets:
        record = {"index": target.index, "present": target.present}
        if target.present:
            record.update(save_mask(image, target.mask, target.index, directory, stem))
            record["score"] = target.score
        if target.coarse is not None:
            coarse = save_mask(image, target.coarse, target.index, directory, f"{stem}_coarse")
            record["coarse"] = coarse
        records.append(record)
    return {
        "image": answer.image_path,
        "prompt": answer.prompt,
        "text": answer.text,
        "targets": records,
    }


def describe(answer: Answer) -> str:
    """Human-readable lines: the text, then each target ("not present" for a `[REJ]`)."""
    lines = [answer.text]
    for target in answer.targets:
        if target.present:
            lines.append(
                f"  [SEG] {target.index}: mask of {int(target.mask.sum())} pixels, "
                f"predicted IoU {target.score:.3f}"
            )
        else:
            lines.append(f"  [REJ] {target.index}: not present in the image")
        if target.coarse is not None:
            lines.append(
                f"    prompted by the coarse mask of its chain token: "
                f"{int(target.coarse.sum())} pixels"
            )
    return "\n".join(lines)
