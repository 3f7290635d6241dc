"""The segmenter: LLaVA answers with `[SEG]`/`[REJ]`; the hidden state predicting each `[SEG]`,
projected to the prompt width, prompts a SAM or SAM 2 mask decoder (`model.mask_models`).

`forward` reads top to bottom as five steps:
1. `find_targets`: the positions that predict a `[SEG]` or `[REJ]`, grouped per image in order,
   checked against the ground-truth mask counts before any heavy work; with a chain token, also
   the positions predicting it and the link of each target to its chain token (`Chains`).
2. `encode_images`: SAM image embeddings once per image (frozen encoder), plus the M2SA
   early-feature fusion when enabled (SAM 2: its high-resolution levels, projected by the
   decoder's trainable convolutions).
3. `hidden_states` and `answer_logits`: CLIP once per image, the LLM over every conversation ->
   hidden states; the LM head on the positions that need it (see below) -> CE and decisions.
4. `project` then `decode`: one projector call for every target (and chain token); the `[SEG]`
   prompts of all images go through one mask-decoder call (`decode_targets`), or two with a
   chain token (`decode_chained`); masks are post-processed to the original image size.
   A `[REJ]` gets an empty mask and no decoder work.
5. `losses`: CE on the answer tokens, BCE + Dice on `[SEG]` masks only (and on the coarse masks
   that prompt them with `supervise_coarse`).
Logits only where needed: in training the LM head runs only on the positions whose next label
is scored (`scored_positions`) and on those predicting a `[SEG]`/`[REJ]` (whose argmax is the
teacher-forced decision), never on the full [C, L, V] tensor, which for a 32k vocabulary is
about 0.5 GB in fp32 per micro-batch plus its gradient. The CE equals the full-logit path (same
sum over the same tokens, same count). In eval mode, or with `full_logits=True`
(`--full_logits`), the head runs on every position and `SegmenterOutput.logits` holds them, as
evaluation and the tests of generation read them.
With `packing=True` (`--packing`) the LLM runs padding-free (model.packing): the hidden states
at padding positions are zero instead of the padded pass's, and nothing downstream reads them.
The graph is static: the projector and the mask decoder run exactly once per batch (see
`decode_targets`), which ZeRO-3 on several ranks requires.

Chained decoding (`TokenIds.chain`, CoReS's `[SEG_SEMA]` in "It usually appears on [SEG_SEMA].
It is [SEG]."): the state predicting a chain token prompts a first decoder pass, a coarse mask;
its low-resolution logits, through SAM's mask embedding, become the dense prompt of the second
pass of the conversation's next target (`model.tokens.chain_links`), as CoReS passes
`masks=low_res_masks` to its prompt encoder. Gradients flow from the final mask through the
mask embedding into the first pass and the chain token's state (no detach, as CoReS). Every
rank runs the projector once, the mask embedding once and the decoder twice per batch, whatever
its batch holds (see `decode_chained`).

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

from model.backbone import (
    image_features,
    language_model_hidden_states,
    packed_language_model_hidden_states,
    per_conversation,
)
from model.batch import Batch
from model.losses import (
    LossWeights,
    causal_lm_loss,
    mask_losses,
    scored_positions,
    selected_lm_loss,
)
from model.mask_models import ImageEmbeddings, kind_of
from model.sam import EarlyFusion
from model.tokens import TokenIds, chain_links, predictor_mask

# Logit written for a `[REJ]` target's mask: sigmoid ~ 0 and binarises to empty, yet finite.
EMPTY_MASK_LOGIT = -1.0e4
DEFAULT_LOSS_WEIGHTS = LossWeights()


@dataclass
class Chains:
    """The chain tokens of a batch, ordered like the targets, and the link of each target.

    conv, position: long [P], where the hidden state predicting each chain token sits.
    counts: chain tokens per image (length N).
    link: long [T], the chain token (index into the P) whose coarse mask prompts each target,
        -1 for a plain target (`model.tokens.chain_links`).
    """

    conv: torch.Tensor
    position: torch.Tensor
    counts: list[int]
    link: torch.Tensor


def find_chains(
    conv_image: torch.Tensor,
    num_images: int,
    target_conv: torch.Tensor,
    target_position: torch.Tensor,
    chain_conv: torch.Tensor,
    chain_position: torch.Tensor,
) -> Chains:
    """`Chains` from the sorted (conversation, position) pairs of the targets [T] and of the
    chain tokens [P]; conv_image: long [C]."""
    counts = torch.bincount(conv_image[chain_conv], minlength=num_images).tolist()
    link = chain_links(target_conv, target_position, chain_conv, chain_position)
    return Chains(chain_conv, chain_position, counts, link)


@dataclass
class Targets:
    """The `[SEG]`/`[REJ]` targets of a batch, ordered by image, conversation, position.

    conv, position: long [T], where the hidden state predicting each target sits.
    is_rej: bool [T], True for `[REJ]`.
    counts: targets per image (length N).
    chains: the chain tokens and links; None without a chain token.
    """

    conv: torch.Tensor
    position: torch.Tensor
    is_rej: torch.Tensor
    counts: list[int]
    chains: Chains | None = None

    def images(self) -> torch.Tensor:
        """long [T], the image of each target."""
        device = self.conv.device
        return torch.repeat_interleave(
            torch.arange(len(self.counts), device=device),
            torch.tensor(self.counts, dtype=torch.long, device=device),
        )


@dataclass
class DecodedTargets:
    """What `Segmenter.decode_targets` returns.

    masks: per image float32 [k_i, H_i, W_i] mask logits at the original size.
    scores: per image float32 [k_i], SAM's predicted IoU of each mask (0 for `[REJ]` rows).
    anchor_term: 0-dim zero that keeps the projector and decoder in the backward graph.
    coarse_masks, coarse_scores, coarse_source: as in `SegmenterOutput` (empty without chaining).
    """

    masks: list[torch.Tensor]
    scores: list[torch.Tensor]
    anchor_term: torch.Tensor
    coarse_masks: list[torch.Tensor] = field(default_factory=list)
    coarse_scores: list[torch.Tensor] = field(default_factory=list)
    coarse_source: list[torch.Tensor] = field(default_factory=list)


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
    coarse_masks: per image float32 [c_i, H_i, W_i], the chain tokens' mask logits at the
        original size, in order ([0, H_i, W_i] without chaining).
    coarse_scores: per image float32 [c_i], SAM's predicted IoU of each coarse mask.
    coarse_source: per image long [k_i], for each target the index of the image's coarse mask
        that prompts it, -1 for a plain target (`[REJ]` rows keep their link, undecoded).
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
    coarse_masks: list[torch.Tensor] = field(default_factory=list)
    coarse_scores: list[torch.Tensor] = field(default_factory=list)
    coarse_source: list[torch.Tensor] = field(default_factory=list)


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
        packing: bool = False,
        supervise_coarse: bool = False,
    ) -> None:
        super().__init__()
        if (early_fusion is None) != (early_layer is None):
            raise ValueError("early_fusion and early_layer are given together or not at all")
        if supervise_coarse and token_ids.chain is None:
            raise ValueError("supervise_coarse needs a chain token (--chain_token)")
        self.llava = llava
        self.sam = sam
        self.mask_kind = kind_of(sam)
        self.text_hidden_fcs = text_hidden_fcs
        self.early_fusion = early_fusion
        self.early_layer = early_layer
        self.token_ids = token_ids
        self.loss_weights = loss_weights
        self.full_logits = full_logits
        self.packing = packing
        self.supervise_coarse = supervise_coarse

    @property
    def sam_input_size(self) -> int:
        return self.mask_kind.input_size(self.sam)

    def forward(self, batch: Batch) -> SegmenterOutput:
        targets = self.find_targets(batch)
        image_embeddings = self.encode_images(batch.sam_pixels)
        hidden = self.hidden_states(batch)
        answer = self.answer_logits(hidden, batch.labels, targets)
        chains = targets.chains
        prompts, chain_prompts, anchor = self.project(
            hidden[targets.conv, targets.position],
            None if chains is None else hidden[chains.conv, chains.position],
            hidden[0, 0],
        )
        decoded = self.decode(image_embeddings, prompts, chain_prompts, anchor, targets, batch)
        output = self.losses(batch, targets, answer, prompts, decoded)
        output.loss = output.loss + decoded.anchor_term
        output.mask_scores = decoded.scores
        return output

    def project(
        self, states: torch.Tensor, chain_states: torch.Tensor | None, anchor_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One projector call: states [T, H] of the targets, chain_states [P, H] (or None) and
        an anchor state [H] (the batch's first position, decoded when there is no `[SEG]`) ->
        (prompts [T, D], chain prompts [P, D] or None, anchor [D])."""
        rows = [states] if chain_states is None else [states, chain_states]
        projected = self.text_hidden_fcs[0](torch.cat([*rows, anchor_state[None]]))
        prompts = projected[: len(states)]
        chain_prompts = None if chain_states is None else projected[len(states) : -1]
        return prompts, chain_prompts, projected[-1]

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
        chains = None
        if self.token_ids.chain is not None:
            chain_conv, chain_position = torch.nonzero(
                predictor_mask(batch.input_ids, self.token_ids.chain), as_tuple=True
            )
            chains = find_chains(
                conv_image, batch.num_images, conv, position, chain_conv, chain_position
            )
        return Targets(conv, position, is_rej[conv, position], counts, chains)

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

    def encode_images(self, sam_pixels: torch.Tensor) -> ImageEmbeddings:
        """Image embeddings [N, D, g, g] (+ early fusion, + SAM 2's high-resolution levels),
        the frozen encoder run once per image."""
        embeddings, early = self.mask_kind.encode(self.sam, sam_pixels, self.early_layer)
        if self.early_fusion is not None:
            embeddings.embedding = embeddings.embedding + self.early_fusion(early)
        return embeddings

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Hidden states [C, L, H] of the final layer, after the norm (packed with `packing`)."""
        images = image_features(self.llava, batch.clip_pixels, batch.image_grid)
        features = per_conversation(images, batch.conv_image)
        grids = None if batch.image_grid is None else batch.image_grid[batch.conv_image]
        if self.packing:
            return packed_language_model_hidden_states(
                self.llava,
                batch.input_ids,
                batch.attention_mask,
                features,
                self.token_ids.pad,
                grids,
            )
        return language_model_hidden_states(
            self.llava, batch.input_ids, batch.attention_mask, features, grids
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

    def decode(
        self,
        image_embeddings: ImageEmbeddings,
        prompts: torch.Tensor,
        chain_prompts: torch.Tensor | None,
        anchor: torch.Tensor,
        targets: Targets,
        batch: Batch,
    ) -> DecodedTargets:
        """Masks of the targets: `decode_targets` without a chain token (one decoder call),
        `decode_chained` with one (two calls). Shapes as `project` returns them."""
        if targets.chains is None:
            decoded = self.decode_targets(image_embeddings, prompts, anchor, targets, batch)
            decoded.coarse_masks = [masks[:0] for masks in decoded.masks]
            decoded.coarse_scores = [scores[:0] for scores in decoded.scores]
            decoded.coarse_source = [
                torch.full((count,), -1, dtype=torch.long, device=prompts.device)
                for count in targets.counts
            ]
            return decoded
        return self.decode_chained(image_embeddings, prompts, chain_prompts, anchor, targets, batch)

    def decode_targets(
        self,
        image_embeddings: ImageEmbeddings,
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
        image_of_target = targets.images()
        seg_counts = torch.bincount(image_of_target[seg], minlength=len(targets.counts))
        images = torch.nonzero(seg_counts).squeeze(1)
        if images.numel() == 0:
            low_res, _ = self.mask_kind.decode_grid(
                self.sam, image_embeddings[:1], anchor[None, None]
            )
            return DecodedTargets(masks, scores, low_res.sum() * 0.0)
        grid_row = torch.cumsum(seg_counts > 0, 0) - 1
        seg_image = image_of_target[seg]
        slot = (
            torch.arange(len(seg_image), device=device)
            - (torch.cumsum(seg_counts, 0) - seg_counts)[seg_image]
        )
        grid = prompts.new_zeros(len(images), int(seg_counts.max()), prompts.shape[-1])
        grid[grid_row[seg_image], slot] = prompts[seg]
        low_res, iou = self.mask_kind.decode_grid(self.sam, image_embeddings[images], grid)
        for row, image in enumerate(images.tolist()):
            seg_rows = torch.nonzero(seg[image_of_target == image]).squeeze(1)
            masks[image][seg_rows] = self._postprocess(low_res[row, : len(seg_rows)], image, batch)
            scores[image][seg_rows] = iou[row, : len(seg_rows)].float()
        return DecodedTargets(masks, scores, anchor.sum() * 0.0)

    def decode_chained(
        self,
        image_embeddings: ImageEmbeddings,
        prompts: torch.Tensor,
        chain_prompts: torch.Tensor,
        anchor: torch.Tensor,
        targets: Targets,
        batch: Batch,
    ) -> DecodedTargets:
        """Two decoder calls, one row per prompt, each row with its own image embedding.

        Pass 1: the chain prompts [P, D] (the anchor [D] on image 0 when P = 0) -> coarse
        low-res logits, embedded once as dense prompts (`mask_prompt_embeddings`). Pass 2: every
        `[SEG]` prompt with the dense prompt of its linked coarse mask, or SAM's no-mask
        embedding when plain; without any `[SEG]`, the anchor on image 0 with pass 1's first
        dense prompt, and the anchor term is 0 x its sum. So every rank runs the projector once,
        the mask embedding once and the decoder twice, all in the backward graph (ZeRO-3).
        """
        chains = targets.chains
        chain_image = batch.conv_image[chains.conv]
        if len(chains.conv):
            first_embeddings, first_prompts = image_embeddings[chain_image], chain_prompts
        else:
            first_embeddings, first_prompts = image_embeddings[:1], anchor[None]
        coarse, coarse_iou = self.mask_kind.decode_rows(
            self.sam,
            first_embeddings,
            first_prompts,
            self._no_mask_dense(len(first_prompts), image_embeddings.embedding),
        )
        coarse_dense = self.mask_kind.mask_prompt(self.sam, coarse)
        masks = self.empty_masks(targets, batch, prompts.device)
        scores = [torch.zeros(count, device=prompts.device) for count in targets.counts]
        seg = ~targets.is_rej
        if not seg.any():
            final, _ = self.mask_kind.decode_rows(
                self.sam, image_embeddings[:1], anchor[None], coarse_dense[:1]
            )
            anchor_term = final.sum() * 0.0
        else:
            # row 0: no mask prompt; row 1 + j: chain token j's coarse mask
            table = torch.cat([self._no_mask_dense(1, coarse_dense), coarse_dense])
            seg_image = targets.images()[seg]
            final, iou = self.mask_kind.decode_rows(
                self.sam, image_embeddings[seg_image], prompts[seg], table[chains.link[seg] + 1]
            )
            self._place_rows(masks, scores, seg, final, iou, targets, batch)
            anchor_term = anchor.sum() * 0.0
        coarse_masks, coarse_scores = self._coarse_outputs(coarse, coarse_iou, chain_image, batch)
        return DecodedTargets(
            masks, scores, anchor_term, coarse_masks, coarse_scores, self._coarse_source(targets)
        )

    def _no_mask_dense(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """SAM's no-mask dense prompt [rows, D, g, g] in `like`'s dtype."""
        return self.mask_kind.no_mask_dense(self.sam).to(like.dtype).expand(rows, -1, -1, -1)

    def _place_rows(self, masks, scores, seg, low_res, iou, targets: Targets, batch: Batch):
        """Write the decoded `[SEG]` rows (low_res [S, 4g, 4g], iou [S], targets order) into
        the per-image masks and scores, post-processed to each image's size."""
        seg_per_image = seg.split(targets.counts)
        low_res_per_image = low_res.split([int(rows.sum()) for rows in seg_per_image])
        iou_per_image = iou.split([int(rows.sum()) for rows in seg_per_image])
        for image, rows in enumerate(seg_per_image):
            if rows.any():
                masks[image][rows] = self._postprocess(low_res_per_image[image], image, batch)
                scores[image][rows] = iou_per_image[image].float()

    def _postprocess(self, low_res: torch.Tensor, image: int, batch: Batch) -> torch.Tensor:
        return self.mask_kind.postprocess(
            self.sam,
            low_res,
            tuple(batch.resized_sizes[image].tolist()),
            tuple(batch.original_sizes[image].tolist()),
        )

    def _coarse_outputs(self, coarse, coarse_iou, chain_image, batch: Batch):
        """Per image coarse masks float32 [c_i, H_i, W_i] and scores [c_i] from pass 1's rows
        (coarse [P, 4g, 4g], iou [P]; the anchor row when P = 0 is not a coarse mask)."""
        masks, scores = [], []
        for image in range(batch.num_images):
            rows = torch.nonzero(chain_image == image).squeeze(1)
            height, width = batch.original_sizes[image].tolist()
            if len(rows):
                masks.append(self._postprocess(coarse[rows], image, batch))
                scores.append(coarse_iou[rows].float())
            else:
                masks.append(coarse.new_zeros(0, height, width, dtype=torch.float32))
                scores.append(coarse.new_zeros(0, dtype=torch.float32))
        return masks, scores

    def _coarse_source(self, targets: Targets) -> list[torch.Tensor]:
        """Per image long [k_i]: each target's link as an index into its image's coarse masks."""
        chains = targets.chains
        counts = torch.tensor(chains.counts, dtype=torch.long, device=chains.link.device)
        offset = (torch.cumsum(counts, 0) - counts)[targets.images()]
        source = torch.where(chains.link >= 0, chains.link - offset, -1)
        return list(source.split(targets.counts))

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
        decoded: DecodedTargets,
    ) -> SegmenterOutput:
        """Weighted CE + BCE + Dice; CE is 0 without labels, mask terms 0 without masks."""
        ce = answer.ce
        device = ce.device
        rej = list(targets.is_rej.split(targets.counts))
        pred_masks = decoded.masks
        if batch.gt_masks is not None:
            bce, dice = mask_losses(*self.supervised_masks(batch, rej, decoded), device)
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
            coarse_masks=decoded.coarse_masks,
            coarse_scores=decoded.coarse_scores,
            coarse_source=decoded.coarse_source,
        )

    def supervised_masks(
        self, batch: Batch, rej: list[torch.Tensor], decoded: DecodedTargets
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image (predictions [m_i, H_i, W_i], ground truths alike): the `[SEG]` masks, then
        with `supervise_coarse` each coarse mask that prompts a `[SEG]`, against its target's
        ground truth (CoReS's CORES2maskloss variant)."""
        preds, gts = [], []
        for image, is_rej in enumerate(rej):
            pred, gt = decoded.masks[image][~is_rej], batch.gt_masks[image][~is_rej]
            if self.supervise_coarse:
                source = decoded.coarse_source[image]
                linked = ~is_rej & (source >= 0)
                pred = torch.cat([pred, decoded.coarse_masks[image][source[linked]]])
                gt = torch.cat([gt, batch.gt_masks[image][linked]])
            preds.append(pred)
            gts.append(gt)
        return preds, gts
