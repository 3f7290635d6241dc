"""Tokenization, label masking (two different tokenizers), sample processing, collation, and the
tiny model run on a collated batch."""

from __future__ import annotations

import functools
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from model.tiny import build_tiny_segmenter, build_tiny_tokenizer, tiny_model_config
from model.tokens import IGNORE_INDEX, add_segmentation_tokens
from utils.collate import (
    AllConversationsDropped,
    Collator,
    SampleProcessor,
    answer_owner,
    collate,
    encode,
    expand_image,
    process_sample,
    template_for,
    tokenize_conversation,
    tokenize_prompt,
)
from utils.datasets.base import Sample
from utils.preprocess import ImageProcessors

IMAGE_TOKENS = 4
SAM_SIZE = 64
SEGMENT = [
    ("<image>\nCan you segment the red circle and the dog?", "Sure, [SEG] and [REJ]."),
    ("And the blue square?", "It is [SEG]."),
]
VQA = [
    ("<image>\nWhat colour is the circle?", "It is red."),
    ("How many shapes are there? Birds?", "There are three shapes, no birds."),
    ("Which one is bigger?", "The square is bigger than the circle."),
]
# an answer starting with an added token: the separator space becomes a token of its own
SEG_FIRST = [("<image>\nWhere is it?", "[SEG].")]
GPT2_SPECIAL = {
    "unk_token": "<|unk|>",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
}


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: spaces glued to the next word, its own BOS/EOS names)."""
    corpus = [question + " " + answer for question, answer in SEGMENT + VQA] * 3
    model = Tokenizer(models.BPE(unk_token=GPT2_SPECIAL["unk_token"]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(GPT2_SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(corpus, trainer)
    bos = GPT2_SPECIAL["bos_token"]
    model.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, model.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, **GPT2_SPECIAL)


TOKENIZERS = {"llama": build_tiny_tokenizer, "gpt2": gpt2_style_tokenizer}


@functools.cache
def tokenizer_with_tokens(name: str, use_mm_start_end: bool):
    """A TOKENIZERS tokenizer with the segmentation tokens added, built once per settings."""
    tokenizer = TOKENIZERS[name]()
    return tokenizer, add_segmentation_tokens(tokenizer, use_mm_start_end=use_mm_start_end)


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer_and_ids(request):
    tokenizer = TOKENIZERS[request.param]()
    return tokenizer, add_segmentation_tokens(tokenizer, use_mm_start_end=True)


def labelled_runs(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of labelled tokens; labels equal the ids wherever set."""
    labelled = labels != IGNORE_INDEX
    assert torch.equal(labels[labelled], input_ids[labelled])
    runs, current = [], []
    for token, keep in zip(input_ids.tolist(), labelled.tolist(), strict=True):
        if keep:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize(
    ("conv_type", "rounds"),
    [
        ("llava_v1", SEGMENT),
        ("llava_v1", VQA),
        ("llava_v1", SEG_FIRST),
        ("llava_llama_2", SEGMENT),
        ("llava_llama_2", VQA),
        ("llava_llama_2", SEG_FIRST),
    ],
)
def test_labels_cover_exactly_the_answers_and_eos(tokenizer_and_ids, conv_type, rounds) -> None:
    tokenizer, token_ids = tokenizer_and_ids
    template = template_for(tokenizer, conv_type)
    input_ids, labels = tokenize_conversation(rounds, tokenizer, token_ids, IMAGE_TOKENS, template)
    # llama_2 writes "{answer} </s>": the space before the end-of-turn belongs to the answer
    gap = " " if conv_type == "llava_llama_2" else ""
    expected = [f"{answer}{gap}{tokenizer.eos_token}" for _, answer in rounds]
    # byte-level BPE glues the separator space to the answer's first word (" It"), so that
    # token is the answer's and decodes with its space
    decoded = [tokenizer.decode(run).removeprefix(" ") for run in labelled_runs(input_ids, labels)]
    assert decoded == expected
    assert input_ids[0] == token_ids.bos and labels[0] == IGNORE_INDEX
    assert (input_ids == token_ids.image).sum() == IMAGE_TOKENS
    image_start = int(torch.nonzero(input_ids == token_ids.im_start))
    assert input_ids[image_start + IMAGE_TOKENS + 1] == token_ids.im_end
    assert (input_ids == token_ids.eos).sum() == len(rounds)


@pytest.mark.parametrize("tokenizer_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("use_mm_start_end", [True, False])
@pytest.mark.parametrize("conv_type", ["llava_v1", "llava_llama_2"])
@pytest.mark.parametrize("rounds", [SEGMENT, VQA, SEG_FIRST])
@pytest.mark.parametrize("image_tokens", [1, 256])
def test_ids_and_labels_equal_those_of_the_fully_expanded_text(
    tokenizer_name, use_mm_start_end, conv_type, rounds, image_tokens
) -> None:
    """tokenize_conversation tokenizes one image token and repeats its id; the oracle tokenizes
    the text with all `image_tokens` image tokens written out and labels it by offsets."""
    tokenizer, token_ids = tokenizer_with_tokens(tokenizer_name, use_mm_start_end)
    template = template_for(tokenizer, conv_type)
    input_ids, labels = tokenize_conversation(rounds, tokenizer, token_ids, image_tokens, template)
    text, spans = template.render(expand_image(rounds, tokenizer, token_ids, image_tokens))
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    expected_ids = np.asarray(encoding["input_ids"])
    owner = answer_owner(text, np.asarray(encoding["offset_mapping"]).reshape(-1, 2), spans)
    assert input_ids.tolist() == expected_ids.tolist()
    assert labels.tolist() == np.where(owner >= 0, expected_ids, IGNORE_INDEX).tolist()
    assert int((input_ids == token_ids.image).sum()) == image_tokens


def test_a_text_with_two_images_names_the_expanded_counts() -> None:
    tokenizer = build_tiny_tokenizer()
    token_ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True)
    template = template_for(tokenizer, "llava_v1")
    rounds = [("<image>\nWhat is this?", "A circle."), ("<image>\nAnd this?", "A dog.")]
    with pytest.raises(ValueError, match="one <image> \\(4 image tokens\\) but it encodes to 8"):
        tokenize_conversation(rounds, tokenizer, token_ids, IMAGE_TOKENS, template)
    text, _ = template.render(expand_image(rounds, tokenizer, token_ids, IMAGE_TOKENS))
    with pytest.raises(ValueError, match="encodes to 8 image tokens"):
        encode(text, tokenizer, token_ids, IMAGE_TOKENS)


@pytest.mark.parametrize("conv_type", ["llava_v1", "llava_llama_2"])
@pytest.mark.parametrize("rounds", [SEGMENT, VQA, SEG_FIRST])
def test_generation_prompt_ends_where_the_labels_start(
    tokenizer_and_ids, conv_type, rounds
) -> None:
    """Training must teach exactly the tokens generation produces after the prompt, including a
    separator space that becomes its own token before an answer starting with [SEG]."""
    tokenizer, token_ids = tokenizer_and_ids
    template = template_for(tokenizer, conv_type)
    input_ids, labels = tokenize_conversation(rounds, tokenizer, token_ids, IMAGE_TOKENS, template)
    labelled = labels != IGNORE_INDEX
    starts = [i for i in range(len(labels)) if labelled[i] and (i == 0 or not labelled[i - 1])]
    for index, start in enumerate(starts):
        open_rounds = [*rounds[:index], (rounds[index][0], None)]
        prompt = tokenize_prompt(open_rounds, tokenizer, token_ids, IMAGE_TOKENS, template)
        assert torch.equal(prompt, input_ids[:start])


@pytest.mark.parametrize("tokenizer_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("conv_type", ["llava_v1", "llava_llama_2"])
@pytest.mark.parametrize("rounds", [SEGMENT, SEG_FIRST])
def test_the_markers_are_written_in_the_models_vocabulary(tokenizer_name, conv_type, rounds):
    """With LaSagnA's vocabulary, [SEG]/[REJ] become <ins>/<no_ins> before rendering: ids and
    labels equal those of the hand-written text, and the generation prompt ends where the
    labels start."""
    tokenizer = TOKENIZERS[tokenizer_name]()
    token_ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True, vocabulary="lasagna")
    template = template_for(tokenizer, conv_type)
    input_ids, labels = tokenize_conversation(rounds, tokenizer, token_ids, IMAGE_TOKENS, template)
    by_hand = [
        (question, answer.replace("[SEG]", "<ins>").replace("[REJ]", "<no_ins>"))
        for question, answer in rounds
    ]
    text, spans = template.render(expand_image(by_hand, tokenizer, token_ids, IMAGE_TOKENS))
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    owner = answer_owner(text, np.asarray(encoding["offset_mapping"]).reshape(-1, 2), spans)
    expected = np.asarray(encoding["input_ids"])
    assert input_ids.tolist() == expected.tolist()
    assert labels.tolist() == np.where(owner >= 0, expected, IGNORE_INDEX).tolist()
    seg_count = sum(answer.count("[SEG]") for _, answer in rounds)
    assert int((labels == token_ids.seg).sum()) == seg_count
    assert int((labels == token_ids.rej).sum()) == sum(a.count("[REJ]") for _, a in rounds)
    first = int(torch.nonzero(labels != IGNORE_INDEX)[0])
    prompt = tokenize_prompt([(rounds[0][0], None)], tokenizer, token_ids, IMAGE_TOKENS, template)
    assert torch.equal(prompt, input_ids[:first])


def test_image_tokens_without_start_end() -> None:
    tokenizer = build_tiny_tokenizer()
    token_ids = add_segmentation_tokens(tokenizer, use_mm_start_end=False)
    template = template_for(tokenizer, "llava_v1")
    input_ids, _ = tokenize_conversation(SEGMENT, tokenizer, token_ids, IMAGE_TOKENS, template)
    first = int(torch.nonzero(input_ids == token_ids.image)[0])
    assert input_ids[first : first + IMAGE_TOKENS].eq(token_ids.image).all()
    with pytest.raises(ValueError, match="encodes to 0 image tokens"):
        tokenize_conversation([("No image here?", "No.")], tokenizer, token_ids, 4, template)


def make_sample(
    size: tuple[int, int], conversations, num_masks: int | None = None, seed: int = 0
) -> Sample:
    """A random image and random 0/1 masks, one per target unless `num_masks` says otherwise."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    if num_masks is None:
        num_masks = sum(
            a.count("[SEG]") + a.count("[REJ]") for conv in conversations for _, a in conv
        )
    masks = rng.integers(0, 2, (num_masks, *size), dtype=np.uint8)
    return Sample(image, conversations, masks, f"img_{seed}.jpg", "test/shapes")


@pytest.fixture(scope="module")
def processor(tiny_dir) -> SampleProcessor:
    tokenizer = build_tiny_tokenizer()
    return SampleProcessor(
        tokenizer=tokenizer,
        token_ids=add_segmentation_tokens(tokenizer, use_mm_start_end=True),
        images=ImageProcessors.from_pretrained(tiny_model_config(tiny_dir).version, SAM_SIZE),
        image_tokens=IMAGE_TOKENS,
    )


def test_mask_count_mismatch_names_the_image_and_both_numbers(processor) -> None:
    sample = make_sample((20, 30), [SEGMENT], num_masks=2)
    with pytest.raises(ValueError, match=r"img_0\.jpg.*3 \[SEG\]/\[REJ\] tokens but there are 2"):
        processor(sample)


def test_too_long_conversations_are_dropped_with_their_masks(processor) -> None:
    long_question = "<image>\n" + "Can you segment the red circle? " * 20
    conversations = [
        [SEGMENT[0]],  # targets 0, 1
        [(long_question, "[SEG] and [SEG].")],  # targets 2, 3
        [("<image>\nThe square?", "[REJ].")],  # target 4
    ]
    sample = make_sample((20, 30), conversations)
    full = process_sample(
        sample, processor.tokenizer, processor.token_ids, processor.images, IMAGE_TOKENS
    )
    lengths = [len(ids) for ids in full.input_ids]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit and full.dropped_conversations == 0
    drop = replace(processor, too_long="drop")
    kept = replace(drop, model_max_length=limit)(sample)
    assert kept.dropped_conversations == 1 and kept.truncated_conversations == 0
    assert [len(ids) for ids in kept.input_ids] == [lengths[0], lengths[2]]
    assert torch.equal(kept.masks, torch.from_numpy(sample.masks[[0, 1, 4]]))
    other = drop(make_sample((20, 30), [[SEGMENT[0]]], num_masks=2, seed=1))
    assert collate([kept, other], processor.token_ids.pad).dropped_conversations == 1
    with pytest.raises(AllConversationsDropped, match=r"img_0\.jpg.*all 3 conversations"):
        replace(drop, model_max_length=min(lengths) - 1)(sample)


# targets 2 and 3 of TRUNCATED: the limit falls between them
LONG_ANSWER = "[SEG] is the circle. " + "It is round and red and small. " * 12 + "[SEG] is the dog."
TRUNCATED = [
    [SEGMENT[0]],  # targets 0, 1
    [("<image>\nWhere are the circle and the dog?", LONG_ANSWER)],  # targets 2, 3
    [("<image>\nThe square?", "[REJ].")],  # target 4
]


def test_truncation_equals_cutting_the_padded_batch_as_lisa_does(processor) -> None:
    """LISA utils/dataset.py:138-143 cuts the padded ids and labels to a fixed width; with the
    width counted after the image expansion that is `model_max_length`. A cut [SEG] loses its
    mask, so the masks stay one per [SEG]/[REJ] left."""
    sample = make_sample((20, 30), TRUNCATED)
    full = processor(sample)  # no limit: nothing is cut
    seg_positions = torch.nonzero(full.input_ids[1] == processor.token_ids.seg).flatten()
    limit = int(seg_positions[1])  # keeps the first [SEG] of the answer, cuts the second
    assert limit > max(len(full.input_ids[0]), len(full.input_ids[2]))
    cut = replace(processor, model_max_length=limit)(sample)
    assert (cut.truncated_conversations, cut.dropped_conversations) == (1, 0)
    assert torch.equal(cut.masks, torch.from_numpy(sample.masks[[0, 1, 2, 4]]))
    pad = processor.token_ids.pad
    expected, batch = collate([full], pad), collate([cut], pad)
    assert batch.input_ids.shape == (3, limit)
    assert torch.equal(batch.input_ids, expected.input_ids[:, :limit])
    assert torch.equal(batch.labels, expected.labels[:, :limit])
    assert torch.equal(batch.attention_mask, expected.attention_mask[:, :limit])
    assert batch.truncated_conversations == 1 and expected.truncated_conversations == 0
    # the cut conversation's answer is still labelled up to the limit, without its EOS
    assert cut.labels[1][-1] == cut.input_ids[1][-1] != processor.token_ids.eos
    assert collate([cut, cut], pad).truncated_conversations == 2


def test_truncation_keeps_a_seg_on_the_last_position_and_needs_the_image(processor) -> None:
    sample = make_sample((20, 30), TRUNCATED[1:])  # targets 0, 1 and [REJ] 2
    full = processor(sample)
    ids = full.input_ids[0]
    first_seg = int(torch.nonzero(ids == processor.token_ids.seg)[0])
    assert first_seg > len(full.input_ids[1])  # the [REJ] conversation stays whole
    cut = replace(processor, model_max_length=first_seg + 1)(sample)
    assert torch.equal(cut.input_ids[0], ids[: first_seg + 1])
    assert cut.input_ids[0][-1] == processor.token_ids.seg
    assert torch.equal(cut.masks, torch.from_numpy(sample.masks[[0, 2]]))
    before = replace(processor, model_max_length=first_seg)(sample)
    assert torch.equal(before.input_ids[0], ids[:first_seg])
    assert torch.equal(before.masks, torch.from_numpy(sample.masks[[2]]))
    first_image = int(torch.nonzero(ids == processor.token_ids.image)[0])
    with pytest.raises(ValueError, match=r"img_0\.jpg.*keeps 2 of the 4 image tokens"):
        replace(processor, model_max_length=first_image + 2)(sample)
    with pytest.raises(ValueError, match=r"too_long must be one of \('truncate', 'drop'\)"):
        replace(processor, too_long="cut")


def test_collate_pads_right_and_stores_each_image_once(processor) -> None:
    samples = [
        processor(make_sample((20, 30), [SEGMENT, [("<image>\nThe square?", "[SEG].")]], seed=0)),
        processor(make_sample((50, 24), [VQA], seed=1)),
    ]
    # pad with a real token id (LLaMA pads with unk): the attention mask must not depend on it
    pad_id = int(samples[0].input_ids[0][1])
    batch = collate(samples, pad_id)
    lengths = [len(ids) for sample in samples for ids in sample.input_ids]
    assert batch.input_ids.shape == (3, max(lengths))
    assert batch.attention_mask.sum(dim=1).tolist() == lengths
    assert batch.conv_image.tolist() == [0, 0, 1]
    for row, ids in enumerate(ids for sample in samples for ids in sample.input_ids):
        assert torch.equal(batch.input_ids[row, : len(ids)], ids)
        assert (batch.input_ids[row, len(ids) :] == pad_id).all()
        assert (batch.labels[row, len(ids) :] == IGNORE_INDEX).all()
    assert batch.clip_pixels.shape[0] == batch.sam_pixels.shape[0] == 2
    assert batch.sam_pixels.shape[1:] == (3, SAM_SIZE, SAM_SIZE)
    assert batch.resized_sizes.tolist() == [[43, 64], [64, 31]]
    assert batch.original_sizes.tolist() == [[20, 30], [50, 24]]
    assert [tuple(m.shape) for m in batch.gt_masks] == [(4, 20, 30), (0, 50, 24)]
    assert batch.image_paths == ["img_0.jpg", "img_1.jpg"] and batch.sources == ["test/shapes"] * 2


def test_collator_works_as_a_dataloader_collate_fn(processor) -> None:
    collator = pickle.loads(pickle.dumps(Collator(processor.token_ids.pad)))
    samples = [processor(make_sample((20, 30), [SEGMENT], seed=seed)) for seed in range(3)]
    batches = list(DataLoader(samples, batch_size=2, collate_fn=collator))
    assert [batch.num_images for batch in batches] == [2, 1]
    assert batches[1].input_ids.shape[0] == 1


def test_tiny_model_runs_on_a_collated_batch(tiny_dir) -> None:
    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0)
    processor = SampleProcessor.for_model(
        model, tokenizer, tiny_model_config(tiny_dir).version, model_max_length=None
    )
    samples = [
        make_sample((40, 56), [SEGMENT, [("<image>\nThe tree?", "[REJ].")]], seed=0),
        make_sample(
            (48, 30), [[("<image>\nSegment the star and the car.", "[SEG], [SEG].")]], seed=1
        ),
    ]
    batch = Collator(processor.token_ids.pad)([processor(sample) for sample in samples])
    output = model(batch)
    for loss in (output.loss, output.ce_loss, output.mask_bce_loss, output.mask_dice_loss):
        assert torch.isfinite(loss)
    assert output.mask_loss.item() > 0
    assert [tuple(m.shape) for m in output.pred_masks] == [(4, 40, 56), (2, 48, 30)]
    assert [r.tolist() for r in output.target_is_rej] == [
        [False, True, False, True],
        [False, False],
    ]
    assert [len(m) for m in batch.gt_masks] == [len(p) for p in output.pred_masks]
