"""The batch contract between the data pipeline and the model.

One batch holds N images and C >= N conversations; each conversation belongs to one image
(`conv_image`, non-decreasing) and images shared by several conversations are stored and
encoded once. Targets are the `[SEG]` and `[REJ]` tokens of an image's conversations, taken in
order (conversation by conversation, left to right); `gt_masks[i]` holds one mask per target of
image i in that order, all zeros for a `[REJ]` target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Batch:
    """A collated batch (shapes: C conversations of length L, N images).

    input_ids: long [C, L], `<image>` already expanded to one id per image feature.
    attention_mask: bool [C, L], False on padding.
    labels: long [C, L], IGNORE_INDEX except on assistant answers; None at inference.
    conv_image: long [C], index of each conversation's image, non-decreasing.
    clip_pixels: the vision tower's inputs: float [N, 3, h, w] for CLIP, or the flat patches of
        all N images in order, float [sum P_i, D], for Qwen-VL (with `image_grid`).
    sam_pixels: float [N, 3, S, S], SAM inputs (normalised, padded right/bottom to S).
    resized_sizes: long [N, 2], (h', w') of each image inside the SAM input before padding.
    original_sizes: long [N, 2], (H, W) of each original image.
    gt_masks: per image uint8 [k_i, H_i, W_i] in {0, 1, 255 = ignore}, one per target; None at
        inference.
    image_paths: per image, the file it came from (named in error messages).
    sources: per image, the dataset it came from (logging).
    dropped_conversations: conversations left out of this batch for exceeding
        `--model_max_length` (with their masks), for the training log.
    truncated_conversations: conversations of this batch cut to `--model_max_length`.
    image_grid: long [N, 3], the (t, h, w) patch grid of each image (Qwen-VL; image i holds
        t * h * w / merge^2 image tokens), None for CLIP.
    skipped_samples: with `--skip_bad_samples`, the bad records skipped while drawing this
        batch's samples ({source name: count}); None when the mixer does not count.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    conv_image: torch.Tensor
    clip_pixels: torch.Tensor
    sam_pixels: torch.Tensor
    resized_sizes: torch.Tensor
    original_sizes: torch.Tensor
    labels: torch.Tensor | None = None
    gt_masks: list[torch.Tensor] | None = None
    image_paths: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    dropped_conversations: int = 0
    truncated_conversations: int = 0
    skipped_samples: dict[str, int] | None = None
    image_grid: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.sam_pixels.shape[0]

    @property
    def patch_count(self) -> int:
        """Patches of the batch's patch-grid images (Qwen-VL), 0 for CLIP images."""
        return 0 if self.image_grid is None else self.clip_pixels.shape[0]

    def describe_image(self, index: int) -> str:
        """'image i (path, source)' for error messages."""
        details = [
            values[index] for values in (self.image_paths, self.sources) if index < len(values)
        ]
        return f"image {index}" + (f" ({', '.join(details)})" if details else "")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move every tensor to `device`; floating pixel tensors are also cast to `dtype`."""
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                moved[item.name] = value.to(device=device, dtype=cast)
            elif item.name == "gt_masks" and value is not None:
                moved[item.name] = [mask.to(device) for mask in value]
        return replace(self, **moved)
