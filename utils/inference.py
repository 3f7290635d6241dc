"""Inference on images and free-form questions (chat.py, batch mode, and a Python API).

    segmenter = Segmentation.load("runs/merged", precision="bf16", device="cuda")
    answers = segmenter.answer([("photo.jpg", "Where is the cat? Please output a mask.")])
    answers[0].text, answers[0].targets[0].mask   # bool [H, W], or None for a [REJ]

`save_answer` writes, for each generated `[SEG]`, a mask PNG (0/255) and an overlay PNG (the mask
drawn over the image and labelled with its index); a `[REJ]` is reported as not present.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from model.backbone import image_token_count
from model.builder import ModelConfig, build_segmenter
from model.checkpoint import is_merged_checkpoint, read_segmenter_config
from model.generate import generate
from model.legacy import image_settings_directory
from model.segmenter import Segmenter
from model.tokens import IGNORE_INDEX
from utils.collate import ProcessedSample, collate, template_for, tokenize_prompt
from utils.conversation import DEFAULT_CONV_TYPE
from utils.datasets.base import IMAGE_PLACEHOLDER, read_image
from utils.preprocess import ImageProcessors

MASK_THRESHOLD = 0.0
OVERLAY_ALPHA = 0.5
OVERLAY_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 96, 255), (255, 200, 0), (200, 64, 255))
LABEL_SCALE_PER_PIXEL = 1 / 400
MIN_LABEL_SCALE = 0.4
FOREGROUND = 255


@dataclass
class Target:
    """One `[SEG]` or `[REJ]` of an answer, in the order generated.

    present: False for `[REJ]` ("the named target is not in the image").
    mask: bool [H, W] at the image's size (None when not present). score: SAM's predicted IoU.
    """

    index: int
    present: bool
    mask: np.ndarray | None
    score: float | None


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
        saved = read_segmenter_config(version) if is_merged_checkpoint(version) else None
        model, tokenizer = build_segmenter(config)
        device = device or device_default()
        model = model.to(device).eval()
        conv_type = conv_type or (saved.conv_type if saved else DEFAULT_CONV_TYPE)
        images = ImageProcessors.from_pretrained(
            image_settings_directory(version, vision_tower), model.sam_input_size
        )
        return cls(model, tokenizer, images, conv_type, device, config.dtype)

    def prepare(self, image_path: str | Path, prompt: str) -> ProcessedSample:
        """One generation prompt with its image, ready for `collate`."""
        image = read_image(image_path)
        input_ids = tokenize_prompt(
            [(question_text(prompt), None)],
            self.tokenizer,
            self.model.token_ids,
            image_token_count(self.model.llava.config),
            template_for(self.tokenizer, self.conv_type),
        )
        clip_pixels, sam_pixels, resized_size = self.images(image)
        return ProcessedSample(
            clip_pixels=clip_pixels,
            sam_pixels=sam_pixels,
            resized_size=resized_size,
            original_size=tuple(image.shape[:2]),
            input_ids=[input_ids],
            labels=[torch.full_like(input_ids, IGNORE_INDEX)],
            masks=torch.zeros(0, *image.shape[:2], dtype=torch.uint8),
            image_path=str(image_path),
            source="inference",
        )

    def answer(
        self, requests: list[tuple[str | Path, str]], max_new_tokens: int = 512
    ) -> list[Answer]:
        """Answers to (image, prompt) pairs, generated together as one batch."""
        samples = [self.prepare(image, prompt) for image, prompt in requests]
        batch = replace(collate(samples, self.model.token_ids.pad), labels=None, gt_masks=None)
        generation = generate(self.model, batch.to(self.device, self.dtype), max_new_tokens)
        answers = []
        for index, (image, prompt) in enumerate(requests):
            tokens = generation.sequences[index].tolist()
            if tokens and tokens[-1] == self.model.token_ids.eos:
                tokens = tokens[:-1]
            targets = [
                Target(
                    index=slot,
                    present=not bool(is_rej),
                    mask=None if is_rej else (logits > MASK_THRESHOLD).cpu().numpy(),
                    score=None if is_rej else float(score),
                )
                for slot, (is_rej, logits, score) in enumerate(
                    zip(
                        generation.target_is_rej[index],
                        generation.pred_masks[index],
                        generation.mask_scores[index],
                        strict=True,
                    )
                )
            ]
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            answers.append(Answer(str(image), prompt, text.strip(), targets))
        return answers


def overlay(image: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] with `mask` (bool [H, W]) tinted, outlined and labelled `index`."""
    colour = np.array(OVERLAY_COLOURS[index % len(OVERLAY_COLOURS)], dtype=np.float32)
    drawn = image.astype(np.float32)
    drawn[mask] = (1 - OVERLAY_ALPHA) * drawn[mask] + OVERLAY_ALPHA * colour
    drawn = drawn.astype(np.uint8)
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(drawn, contours, -1, tuple(int(c) for c in colour), 1)
    scale = max(MIN_LABEL_SCALE, max(image.shape[:2]) * LABEL_SCALE_PER_PIXEL)
    rows, columns = np.nonzero(mask)
    where = (int(columns.mean()), int(rows.mean())) if len(rows) else (2, int(12 * scale) + 2)
    cv2.putText(
        drawn, str(index), where, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
    )
    return drawn


def save_answer(answer: Answer, directory: str | Path, stem: str) -> dict:
    """Write `<stem>_mask_<i>.png` and `<stem>_overlay_<i>.png` per present target under
    `directory`; returns the JSON record (text, and per target its files and score)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image = read_image(answer.image_path)
    records = []
    for target in answer.targets:
        record = {"index": target.index, "present": target.present}
        if target.present:
            mask_path = directory / f"{stem}_mask_{target.index}.png"
            overlay_path = directory / f"{stem}_overlay_{target.index}.png"
            cv2.imwrite(str(mask_path), target.mask.astype(np.uint8) * FOREGROUND)
            drawn = overlay(image, target.mask, target.index)
            cv2.imwrite(str(overlay_path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            record.update(
                mask=str(mask_path),
                overlay=str(overlay_path),
                score=target.score,
                area=int(target.mask.sum()),
            )
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
    return "\n".join(lines)
