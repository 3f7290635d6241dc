"""Test helpers: a minimal hand-written batch builder (the real collate lives in utils/).

It writes `<s> SYSTEM USER: <im_start><image>*T<im_end>\n QUESTION ASSISTANT: ANSWER</s>`,
with T image-token ids, labels on ANSWER</s> only, right padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.backbone import image_token_count
from model.batch import Batch
from model.tokens import IGNORE_INDEX

SYSTEM = "A chat between a curious human and an artificial intelligence assistant."


@dataclass
class Conversation:
    image: int
    question: str
    answer: str


def encode_conversation(model, tokenizer, conv: Conversation) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation."""
    ids = model.token_ids
    image_tokens = [ids.image] * image_token_count(model.llava.config)
    if ids.im_start is not None:
        image_tokens = [ids.im_start, *image_tokens, ids.im_end]

    def words(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prompt = [
        ids.bos,
        *words(f"{SYSTEM} USER:"),
        *image_tokens,
        *words(f"\n{conv.question} ASSISTANT:"),
    ]
    answer = [*words(conv.answer), ids.eos]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def make_batch(
    model,
    tokenizer,
    image_sizes: list[tuple[int, int]],
    conversations: list[Conversation],
    gt_masks: list[torch.Tensor] | None,
    seed: int = 0,
) -> Batch:
    """Random images of the given (H, W) sizes, resized/padded like SAM, and the conversations."""
    generator = torch.Generator().manual_seed(seed)
    clip_size = model.llava.config.vision_config.image_size
    sam_size = model.sam_input_size
    encoded = [encode_conversation(model, tokenizer, conv) for conv in conversations]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), model.token_ids.pad)
    labels = torch.full((len(encoded), length), IGNORE_INDEX)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
    sam_pixels, resized = [], []
    for height, width in image_sizes:
        scale = sam_size / max(height, width)
        new = (int(height * scale + 0.5), int(width * scale + 0.5))
        image = torch.randn(1, 3, *new, generator=generator)
        sam_pixels.append(F.pad(image, (0, sam_size - new[1], 0, sam_size - new[0]))[0])
        resized.append(new)
    return Batch(
        input_ids=input_ids,
        attention_mask=input_ids != model.token_ids.pad,
        labels=labels,
        conv_image=torch.tensor([conv.image for conv in conversations]),
        clip_pixels=torch.randn(len(image_sizes), 3, clip_size, clip_size, generator=generator),
        sam_pixels=torch.stack(sam_pixels),
        resized_sizes=torch.tensor(resized),
        original_sizes=torch.tensor(image_sizes),
        gt_masks=gt_masks,
        image_paths=[f"img{index}.jpg" for index in range(len(image_sizes))],
    )


def generation_prompts(
    model, tokenizer, image_sizes: list[tuple[int, int]], conversations: list[Conversation]
) -> Batch:
    """`make_batch` cut before each answer: right-padded generation prompts, no labels."""
    from utils.generative_eval import prompt_batch

    batch = make_batch(model, tokenizer, image_sizes, conversations, gt_masks=None)
    return prompt_batch(batch)


RIG_MARGIN = 5.0


def rig_greedy_answer(model, batch: Batch, plan: list[int]) -> None:
    """Edit the LM-head rows of the (distinct) tokens in `plan` so that greedy generation for
    the batch's first conversation writes exactly `plan` (e.g. [SEG], [REJ], EOS).

    The state that chooses step k depends only on the prompt and plan[:k], not on the LM head:
    teacher-force them, then solve for rows whose logit beats every other token by RIG_MARGIN
    at their own step and loses by RIG_MARGIN at the others. Asserts that it worked."""
    from dataclasses import replace

    from model.generate import generate

    length = int(batch.attention_mask[0].sum())
    ids = torch.cat([batch.input_ids[0, :length], torch.tensor(plan[:-1], dtype=torch.long)])
    forced = replace(
        batch,
        input_ids=ids[None],
        attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
        conv_image=torch.zeros(1, dtype=torch.long),
        clip_pixels=batch.clip_pixels[:1],
    )
    with torch.no_grad():
        hidden = model.hidden_states(forced)
        logits = model.llava.lm_head(hidden)
        states = hidden[0, length - 1 :]  # [n, H]: the state choosing each step
        others = logits[0, length - 1 :].clone()
        others[:, plan] = -torch.inf
        best = others.max(dim=1).values  # [n]
        wanted = torch.where(
            torch.eye(len(plan), dtype=torch.bool),
            best[None] + RIG_MARGIN,
            best[None] - RIG_MARGIN,
        )  # [token j, step k]
        rows = wanted @ torch.linalg.pinv(states.T)
        model.llava.lm_head.weight[plan] = rows.to(model.llava.lm_head.weight.dtype)
    written = generate(model, batch, max_new_tokens=len(plan)).sequences[0].tolist()
    assert written == plan, (written, plan)


def write_rigged_checkpoint(tiny_dir, directory, image, question: str, answer: str):
    """A merged checkpoint of the (untrained) tiny segmenter whose LM head is edited so that
    greedy generation answers `question` about `image` (a file or uint8 RGB [H, W, 3]) with
    `answer` then EOS; the answer's tokens must be distinct. Returns the checkpoint directory.

    Quick (no training, one save), for tests that need a `[SEG]` or `[REJ]` in the answer."""
    from dataclasses import replace

    from model.checkpoint import save_merged
    from model.tiny import build_tiny_segmenter
    from utils.collate import collate
    from utils.conversation import DEFAULT_CONV_TYPE
    from utils.inference import Segmentation
    from utils.preprocess import ImageProcessors

    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0, lora_r=0)
    model.eval()
    source = tiny_dir / "llava_tiny"
    images = ImageProcessors.from_pretrained(
        source, model.sam_input_size, mask_model=model.mask_kind.name
    )
    segmentation = Segmentation(model, tokenizer, images, DEFAULT_CONV_TYPE, "cpu", torch.float32)
    batch = collate([segmentation.prepare(image, question)], model.token_ids.pad)
    plan = [*tokenizer.encode(answer, add_special_tokens=False), model.token_ids.eos]
    assert len(set(plan)) == len(plan), f"{answer!r}: tokens {plan} repeat"
    rig_greedy_answer(model, replace(batch, labels=None, gt_masks=None), plan)
    return save_merged(
        model, tokenizer, directory, source_version=source, conv_type=DEFAULT_CONV_TYPE
    )


def rig_merged_checkpoint(merged, image, question: str, roles: list[str], directory):
    """A copy of the merged checkpoint `merged` whose LM head is edited so that greedy
    generation answers `question` about `image` with the tokens of `roles` (TokenIds field
    names, e.g. ["seg", "rej", "eos"]) in the checkpoint's own template; returns its directory."""
    from dataclasses import replace

    from model.checkpoint import save_merged
    from utils.collate import collate
    from utils.inference import Segmentation

    segmentation = Segmentation.load(str(merged), precision="fp32", device="cpu")
    model = segmentation.model
    batch = replace(
        collate([segmentation.prepare(image, question)], model.token_ids.pad),
        labels=None,
        gt_masks=None,
    )
    rig_greedy_answer(model, batch, [getattr(model.token_ids, role) for role in roles])
    return save_merged(
        model,
        segmentation.tokenizer,
        directory,
        source_version=merged,
        conv_type=segmentation.conv_type,
    )


def forward_backward(model, batch: Batch, **settings) -> tuple:
    """Set the segmenter's path switches (`full_logits`, `packing`), then one forward and
    backward from fresh gradients. Returns (SegmenterOutput, {parameter name: gradient})."""
    model.zero_grad(set_to_none=True)
    for name, value in settings.items():
        setattr(model, name, value)
    output = model(batch)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, grads


def evaluate_on_cpu(model, job, processor, rank=0, world_size=1, batch_size=1, **kwargs):
    """`utils.evaluation.evaluate` in fp32 on the CPU as rank `rank` of `world_size`."""
    from utils.evaluation import evaluate

    return evaluate(
        model,
        job,
        processor,
        device="cpu",
        dtype=torch.float32,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        **kwargs,
    )


def reference_mask(model, embedding: torch.Tensor, prompt: torch.Tensor, batch: Batch, image: int):
    """An independent composition's mask of one projected prompt [D] on image `image` (its SAM
    embedding [D, g, g]): one decoder call, then SAM's post-processing by hand (upscale to the
    input size, crop the padding, resize to the original size) -> logits [H, W]."""
    from model.sam import decode_masks

    sam_size = model.sam_input_size
    height, width = batch.original_sizes[image].tolist()
    resized_h, resized_w = batch.resized_sizes[image].tolist()
    low = decode_masks(model.sam, embedding, prompt[None])
    up = F.interpolate(
        low[None].float(), (sam_size, sam_size), mode="bilinear", align_corners=False
    )
    cropped = up[..., :resized_h, :resized_w]
    return F.interpolate(cropped, (height, width), mode="bilinear", align_corners=False)[0, 0]
