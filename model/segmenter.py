"""The segmenter: LLaVA answers with `[SEG]`/`[REJ]`; the hidden state predicting each `[SEG]`,
projected to the prompt width, prompts a SAM mask decoder.

`forward` reads top to bottom as five steps:
1. `find_targets`: the positions that predict a `[SEG]` or `[REJ]`, grouped per image in order,
   checked against the ground-truth mask counts before any heavy work.
2. `encode_images`: SAM image embeddings once per image (frozen encoder), plus the M2SA
   early-feature fusion when enabled.
3. `hidden_states` and `answer_logits`: CLIP once per image, the LLM over every conversation ->
   hidden states; the LM head on the positions that need it (see below) -> CE and decisions.
4. `decode_targets`: project each target's hidden state; the `[SEG]` prompts of all images go
   through one mask-decoder call; masks are post-processed to the original image size.
   A `[REJ]` gets an empty mask and no decoder work.
5. `losses`: CE on the answer tokens, BCE + Dice on `[SEG]` masks only.
Logits only where needed: in training the LM head runs only on the positions whose next label
is scored (`scored_positions`) and on those predicting a `[SEG]`/`[REJ]` (whose argmax is the
teacher-forced decision), never on the full [C, L, V] tensor, which for a 32k vocabulary is
about 0.5 GB in fp32 per micro-batch plus its gradient. The CE equals the full-logit path (same
sum over the same tokens, same count). In eval mode, or with `full_logits=True`
(`--full_logits`), the head runs on every position and `SegmenterOutput.logits` holds them, as
evaluation and the tests of generation read them.
The graph is static: the projector and the mask decoder run exactly once per batch (see
`decode_targets`), which ZeRO-3 on several ranks requires.

`[REJ]` and the mask losses: `[REJ]` rows are left out of both the mask-loss sum and the mask
count, so a batch's mask loss is the mean over its real masks and `[REJ]` is learned through the
language-model loss alone. GSVA instead decodes no mask for `[REJ]` but still scores a constant
zero-logit prediction against an empty target and counts it, which adds about 2.0 * ln 2 + 0.5
per `[REJ]` to the mask loss without any gradient and dilutes the real masks' weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.backbone import image_features, language_model_hidden_states
from model.batch import Batch
from model.losses import (
    LossWeights,
    causal_lm_loss,
    mask_losses,
    scored_positions,
    selected_lm_loss,
)
from model.sam import EarlyFusion, decode_prompt_grid, encode_images, postprocess_masks
from model.tokens import TokenIds, predictor_mask

# Logit written for a `[REJ]` target's mask: sigmoid ~ 0 and binarises to empty, yet finite.
EMPTY_MASK_LOGIT = -1.0e4
DEFAULT_LOSS_WEIGHTS = LossWeights()


@dataclass
class Targets:
    """The `[SEG]`/`[REJ]` targets of a batch, ordered by image, conversation, position.

    conv, position: long [T], where the hidden state predicting each target sits.
    is_rej: bool [T], True for `[REJ]`.
    counts: targets per image (length N).
    """

    conv: torch.Tensor
    position: torch.Tensor
    is_rej: torch.Tensor
    counts: list[int]


@dataclass
class DecodedTargets:
    """What `Segmenter.decode_targets` returns.

    masks: per image float32 [k_i, H_i, W_i] mask logits at the original size.
    scores: per image float32 [k_i], SAM's predicted IoU of each mask (0 for `[REJ]` rows).
    anchor_term: 0-dim zero that keeps the projector and decoder in the backward graph.
    """

    masks: list[torch.Tensor]
    scores: list[torch.Tensor]
    anchor_term: torch.Tensor


@dataclass
class AnswerLogits:
    """What `Segmenter.answer_logits` returns.

    ce: fp32 0-dim CE over the scored answer tokens (0 without labels).
    target_tokens: long [T], argmax of the logits at the position predicting each target.
    logits: [C, L, V] on the full-logit path, else None.
    head_rows: positions the LM head ran on (FLOP accounting).
    """

    ce: torch.Tensor
    target_tokens: torch.Tensor
    logits: torch.Tensor | None
    head_rows: int


@dataclass
class SegmenterOutput:
    """What the segmenter returns (scalars are fp32 0-dim tensors).

    loss: ce_loss_weight * ce_loss + mask_loss.
    mask_loss: bce_loss_weight * mask_bce_loss + dice_loss_weight * mask_dice_loss.
    logits: [C, L, V] language-model logits on the full-logit path (eval mode, or
        `full_logits`); None in training, where only the needed rows are computed.
    pred_masks: per image float32 [k_i, H_i, W_i] mask logits at the original size, one per target
        in order; `[REJ]` rows hold EMPTY_MASK_LOGIT.
    target_is_rej: per image bool [k_i].
    prompt_embeddings: per image [k_i, D] projected hidden states (`[REJ]` rows included).
    mask_scores: per image float32 [k_i], SAM's predicted IoU per mask (0 for `[REJ]` rows).
    target_tokens: per image long [k_i], the argmax token at the position predicting each
        target (teacher-forced decisions: `[SEG]` vs `[REJ]` vs anything else).
    head_rows: positions the LM head ran on.
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_bce_loss: torch.Tensor
    mask_dice_loss: torch.Tensor
    mask_loss: torch.Tensor
    logits: torch.Tensor | None
    pred_masks: list[torch.Tensor]
    target_is_rej: list[torch.Tensor]
    prompt_embeddings: list[torch.Tensor]
    mask_scores: list[torch.Tensor] = field(default_factory=list)
    target_tokens: list[torch.Tensor] = field(default_factory=list)
    head_rows: int = 0


def build_projector(hidden_size: int, out_dim: int) -> nn.ModuleList:
    """LISA's `text_hidden_fcs`: [Linear(H, H) -> ReLU -> Linear(H, out_dim)] (keys 0.0, 0.2)."""
    return nn.ModuleList(
        [
            nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim)
            )
        ]
    )


class Segmenter(nn.Module):
    """LLaVA + projector + SAM. Built parts in, no I/O (see model.builder for loading)."""

    def __init__(
        self,
        llava: nn.Module,
        sam: nn.Module,
        text_hidden_fcs: nn.ModuleList,
        token_ids: TokenIds,
        loss_weights: LossWeights = DEFAULT_LOSS_WEIGHTS,
        early_fusion: EarlyFusion | None = None,
        early_layer: int | None = None,
        full_logits: bool = False,
    ) -> None:
        super().__init__()
        if (early_fusion is None) != (early_layer is None):
            raise ValueError("early_fusion and early_layer are given together or not at all")
        self.llava = llava
        self.sam = sam
        self.text_hidden_fcs = text_hidden_fcs
        self.early_fusion = early_fusion
        self.early_layer = early_layer
        self.token_ids = token_ids
        self.loss_weights = loss_weights
        self.full_logits = full_logits

    @property
    def sam_input_size(self) -> int:
        return self.sam.config.vision_config.image_size

    def forward(self, batch: Batch) -> SegmenterOutput:
        targets = self.find_targets(batch)
        image_embeddings = self.encode_images(batch.sam_pixels)
        hidden = self.hidden_states(batch)
        answer = self.answer_logits(hidden, batch.labels, targets)
        # one projector call: the predicting states of the targets, plus an anchor row (the
        # first position of the batch) that decode_targets uses when there is no [SEG]
        states = torch.cat([hidden[targets.conv, targets.position], hidden[:1, 0]])
        projected = self.text_hidden_fcs[0](states)
        prompts, anchor = projected[:-1], projected[-1]
        decoded = self.decode_targets(image_embeddings, prompts, anchor, targets, batch)
        output = self.losses(batch, targets, answer, prompts, decoded.masks)
        output.loss = output.loss + decoded.anchor_term
        output.mask_scores = decoded.scores
        return output

    def find_targets(self, batch: Batch) -> Targets:
        """Locate every `[SEG]`/`[REJ]` and check the counts against `batch.gt_masks`."""
        conv_image = batch.conv_image
        if conv_image.numel() and (conv_image.diff() < 0).any():
            raise ValueError(f"conv_image must be non-decreasing, got {conv_image.tolist()}")
        is_seg = predictor_mask(batch.input_ids, self.token_ids.seg)
        is_rej = predictor_mask(batch.input_ids, self.token_ids.rej)
        conv, position = torch.nonzero(is_seg | is_rej, as_tuple=True)
        counts = torch.bincount(conv_image[conv], minlength=batch.num_images).tolist()
        if batch.gt_masks is not None:
            self._check_counts(batch, counts, is_rej[conv, position])
        return Targets(conv, position, is_rej[conv, position], counts)

    def _check_counts(self, batch: Batch, counts: list[int], target_is_rej: torch.Tensor) -> None:
        rej_per_image = torch.split(target_is_rej, counts)
        for index, (count, masks) in enumerate(zip(counts, batch.gt_masks, strict=True)):
            if masks.shape[0] != count:
                rej = int(rej_per_image[index].sum())
                raise ValueError(
                    f"{batch.describe_image(index)}: its conversations hold {count} target tokens "
                    f"({count - rej} [SEG], {rej} [REJ]) but {masks.shape[0]} ground-truth masks "
                    "were given; each [SEG]/[REJ] needs exactly one mask, in order"
                )

    def encode_images(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings [N, D, g, g] (+ early fusion), encoder run once per image."""
        embeddings, early = encode_images(self.sam, sam_pixels, self.early_layer)
        if self.early_fusion is not None:
            embeddings = embeddings + self.early_fusion(early)
        return embeddings

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Hidden states [C, L, H] of the final layer, after the norm."""
        features = image_features(self.llava, batch.clip_pixels)
        return language_model_hidden_states(
            self.llava, batch.input_ids, batch.attention_mask, features[batch.conv_image]
        )

    @property
    def uses_full_logits(self) -> bool:
        """Whether forward computes [C, L, V] logits: in eval mode or with `full_logits`."""
        return self.full_logits or not self.training

    def answer_logits(
        self, hidden: torch.Tensor, labels: torch.Tensor | None, targets: Targets
    ) -> AnswerLogits:
        """CE and target decisions from hidden [C, L, H] and labels [C, L] (or None).

        Trimmed (training): one LM-head call on [S + T, H], the S scored positions then the T
        target-predicting ones. Full: the head on all C x L positions, CE by `causal_lm_loss`.
        """
        zero = hidden.new_zeros((), dtype=torch.float32)
        if self.uses_full_logits:
            logits = self.llava.lm_head(hidden)
            ce = causal_lm_loss(logits, labels) if labels is not None else zero
            decided = logits[targets.conv, targets.position].argmax(dim=-1)
            return AnswerLogits(ce, decided, logits, hidden.shape[0] * hidden.shape[1])
        if labels is None:
            conv = position = targets.conv.new_zeros(0)
        else:
            conv, position = scored_positions(labels)
        rows = hidden[torch.cat([conv, targets.conv]), torch.cat([position, targets.position])]
        logits = self.llava.lm_head(rows)
        scored = len(conv)
        ce = (
            zero
            if labels is None
            else selected_lm_loss(logits[:scored], labels[conv, position + 1])
        )
        decided = logits[scored:].argmax(dim=-1)
        return AnswerLogits(ce, decided, None, len(rows))

    def decode_targets(
        self,
        image_embeddings: torch.Tensor,
        prompts: torch.Tensor,
        anchor: torch.Tensor,
        targets: Targets,
        batch: Batch,
    ) -> DecodedTargets:
        """Masks and scores per image; `[SEG]` rows decoded, `[REJ]` rows empty.

        prompts: [T, D] projected states of the targets; anchor: [D]. The mask decoder runs
        exactly once per batch: the images holding `[SEG]` targets, each with its prompts padded
        to the largest count. Without any `[SEG]` it decodes the `anchor` prompt on image 0 and
        the anchor term is 0 x its sum. Every rank then runs the same modules the same number of
        times, and the projector, decoder and fusion are in every backward graph: ZeRO-3 gathers
        parameters per module call and reduces gradients per parameter, so ranks whose batches
        differ would otherwise wait forever.
        """
        device = prompts.device
        masks = self.empty_masks(targets, batch, device)
        scores = [torch.zeros(count, device=device) for count in targets.counts]
        seg = ~targets.is_rej
        image_of_target = torch.repeat_interleave(
            torch.arange(len(targets.counts), device=device),
            torch.tensor(targets.counts, device=device),
        )
        seg_counts = torch.bincount(image_of_target[seg], minlength=len(targets.counts))
        images = torch.nonzero(seg_counts).squeeze(1)
        if images.numel() == 0:
            low_res, _ = decode_prompt_grid(self.sam, image_embeddings[:1], anchor[None, None])
            return DecodedTargets(masks, scores, low_res.sum() * 0.0)
        grid_row = torch.cumsum(seg_counts > 0, 0) - 1
        seg_image = image_of_target[seg]
        slot = (
            torch.arange(len(seg_image), device=device)
            - (torch.cumsum(seg_counts, 0) - seg_counts)[seg_image]
        )
        grid = prompts.new_zeros(len(images), int(seg_counts.max()), prompts.shape[-1])
        grid[grid_row[seg_image], slot] = prompts[seg]
        low_res, iou = decode_prompt_grid(self.sam, image_embeddings[images], grid)
        for row, image in enumerate(images.tolist()):
            seg_rows = torch.nonzero(seg[image_of_target == image]).squeeze(1)
            masks[image][seg_rows] = postprocess_masks(
                low_res[row, : len(seg_rows)],
                self.sam_input_size,
                tuple(batch.resized_sizes[image].tolist()),
                tuple(batch.original_sizes[image].tolist()),
            )
            scores[image][seg_rows] = iou[row, : len(seg_rows)].float()
        return DecodedTargets(masks, scores, anchor.sum() * 0.0)

    def empty_masks(self, targets: Targets, batch: Batch, device) -> list[torch.Tensor]:
        """Per image float32 [k_i, H_i, W_i] filled with EMPTY_MASK_LOGIT."""
        return [
            torch.full(
                (count, *batch.original_sizes[index].tolist()), EMPTY_MASK_LOGIT, device=device
            )
            for index, count in enumerate(targets.counts)
        ]

    def losses(
        self,
        batch: Batch,
        targets: Targets,
        answer: AnswerLogits,
        prompts: torch.Tensor,
        pred_masks: list[torch.Tensor],
    ) -> SegmenterOutput:
        """Weighted CE + BCE + Dice; CE is 0 without labels, mask terms 0 without masks."""
        ce = answer.ce
        device = ce.device
        rej = list(targets.is_rej.split(targets.counts))
        if batch.gt_masks is not None:
            seg_preds = [pred[~is_rej] for pred, is_rej in zip(pred_masks, rej, strict=True)]
            seg_gts = [gt[~is_rej] for gt, is_rej in zip(batch.gt_masks, rej, strict=True)]
            bce, dice = mask_losses(seg_preds, seg_gts, device)
        else:
            bce = dice = torch.zeros((), device=device)
        weights = self.loss_weights
        mask_loss = weights.bce_loss_weight * bce + weights.dice_loss_weight * dice
        return SegmenterOutput(
            loss=weights.ce_loss_weight * ce + mask_loss,
            ce_loss=ce,
            mask_bce_loss=bce,
            mask_dice_loss=dice,
            mask_loss=mask_loss,
            logits=answer.logits,
            pred_masks=pred_masks,
            target_is_rej=rej,
            prompt_embeddings=list(prompts.split(targets.counts)),
            target_tokens=list(answer.target_tokens.split(targets.counts)),
            head_rows=answer.head_rows,
        )
