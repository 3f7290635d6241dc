"""The reference code's template lists, as data, exactly as each upstream file spells them
(image token and `{class_name}` / `{sent}` / `{seg}` placeholders included), for the template
tests. Each list names its upstream file and lines at the commit below; the draw rules that use
them are cited beside the tests that reproduce them (tests/utils/test_templates.py)."""

from __future__ import annotations

LISA_REPO, LISA_COMMIT = "dvlab-research/LISA", "3cb2d4301f1af4691bd4f3938335ef06e76f155a"
MMR_REPO, MMR_COMMIT = "jdg900/MMR", "702a7b60e993b0c8ce24f93f57ed5fc3f425b0fa"
GSVA_REPO, GSVA_COMMIT = "LeapLabTHU/GSVA", "618dc7957cd239442d1ecd45c8d575cf91b9ca8e"
CORES_REPO, CORES_COMMIT = "baoxiaoyi/CoReS", "296ee1f8a19d299eda5554e0258cf9dabf17573d"

# LISA utils/utils.py:14-23 SHORT_QUESTION_LIST (MMR utils/utils.py:14-23 is identical)
LISA_SHORT_QUESTION_LIST = [
    "<image>\nCan you segment the {class_name} in this image?",
    "<image>\nPlease segment the {class_name} in this image.",
    "<image>\nWhat is {class_name} in this image? Please respond with segmentation mask.",
    "<image>\nWhat is {class_name} in this image? Please output segmentation mask.",
]
# LISA utils/utils.py:25-28 LONG_QUESTION_LIST (MMR utils/utils.py:25-28 is identical)
LISA_LONG_QUESTION_LIST = [
    "<image>\n{sent} Please respond with segmentation mask.",
    "<image>\n{sent} Please output segmentation mask.",
]
# LISA utils/utils.py:30-34 EXPLANATORY_QUESTION_LIST
LISA_EXPLANATORY_QUESTION_LIST = [
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
]
# LISA utils/utils.py:36-42 ANSWER_LIST
LISA_ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]

# MMR utils/utils.py:36-42 ANSWER_LIST
MMR_ANSWER_LIST = [
    "It is {seg}.",
    "Sure, {seg}.",
    "Sure, it is {seg}.",
    "Sure, the segmentation result is {seg}.",
    "{seg}.",
]
# MMR utils/utils.py:44-48 SINGLE_ANSWER_LIST
MMR_SINGLE_ANSWER_LIST = [
    "{class_name} is {seg}.",
    "The segmentation result of {class_name} is {seg}.",
    "{seg}.",
]
# MMR utils/utils.py:50-62 MULTI_ANSWER_LIST
MMR_MULTI_ANSWER_LIST = [
    "{class_name} are {seg}, separately.",
    "{class_name} are {seg}.",
    "Sure, {class_name} are {seg}, separately.",
    "Sure, {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}, separately.",
    "Sure, the segmentation result of {class_name} are {seg}.",
    "Sure, the segmentation result of {class_name} are {seg}, separately.",
    "Sure, they are {seg}.",
    "They are {seg}.",
    "{seg}.",
]
# MMR utils/utils.py:80-88 EXPAND_LONG_QUESTION_LIST
MMR_EXPAND_LONG_QUESTION_LIST = [
    "<image>\n{sent} Provide the segmentation mask.",
    "<image>\n{sent} Output the segmentation mask.",
    "<image>\n{sent} Please show the segmentation mask.",
    "<image>\n{sent} I'd appreciate segmentation masks.",
    "<image>\n{sent} Please highlight the segmentation mask.",
]
# MMR utils/utils.py:90-119 EXPAND_QUESTION_LIST
MMR_EXPAND_QUESTION_LIST = [
    "<image>\nCould you identify the {class_name} in this picture?",
    "<image>\nAre you able to delineate the {class_name} in the image?",
    "<image>\nCan you pinpoint the {class_name} in this photo?",
    "<image>\nIs it possible for you to highlight the {class_name} in this image?",
    "<image>\nCan you discern the {class_name} in the given picture?",
    "<image>\nCan you provide me with asegment of the {class_name}?",
    "<image>\nPlease perform image segmentation to isolate the {class_name} in this image.",
    "<image>\nHelp me segment the {class_name}.",
    "<image>\nWould you be willing to segment the {class_name}?",
    "<image>\nCan you identify {class_name} in this picture? Please provide a segmentation mask.",
    "<image>\nCould you point out {class_name} in this image and show it with a segmentation mask?",
    "<image>\nIn this image, where is {class_name}? I'd appreciate a segmentation mask.",
    "<image>\nPlease highlight {class_name} in this image using a segmentation mask.",
    "<image>\nIn the picture provided, can you show where {class_name} is with a segmentation "
    "mask?",
]
# The lists MMR draws from with --use_expand_question_list and its default mix: SemSegDataset
# (utils/sem_seg_dataset.py:160,167-168) and ReferSegDataset (utils/refer_seg_dataset.py:50,
# 57-58) each `extend` the shared SHORT_QUESTION_LIST object; MultiPartReasonSegDataset
# (utils/multi_part_reason_seg_dataset.py:61,69-70) extends LONG_QUESTION_LIST once.
MMR_EXPANDED_SHORT_DRAW_LIST = (
    LISA_SHORT_QUESTION_LIST + MMR_EXPAND_QUESTION_LIST + MMR_EXPAND_QUESTION_LIST
)
MMR_EXPANDED_LONG_DRAW_LIST = LISA_LONG_QUESTION_LIST + MMR_EXPAND_LONG_QUESTION_LIST

# GSVA model/llava/constants.py:40-49 SHORT_QUESTION_LIST_MODE4
GSVA_SHORT_QUESTION_LIST_MODE4 = [
    "<image>\nCan you segment {class_name} in this image?",
    "<image>\nPlease segment {class_name} in this image.",
    "<image>\nWhat are {class_name} in this image? Please respond with segmentation masks.",
    "<image>\nWhat are {class_name} in this image? Please output segmentation masks.",
]
# GSVA model/llava/constants.py:78-84, 86-92, 94-96 ANSWER_LIST_MODE4_START / _TEMPLATE / _END
GSVA_ANSWER_LIST_MODE4_START = [
    "The segmentation results are",
    "Sure, they are",
    "Sure,",
    "Sure,",
    "Sure,",
]
GSVA_ANSWER_LIST_MODE4_TEMPLATE = [
    "{class_name} [SEG]",
    "{class_name}:[SEG]",
    "the mask of {class_name} is [SEG]",
    "the segmentation of {class_name} is [SEG]",
    "the referred {class_name} is [SEG]",
]
GSVA_ANSWER_LIST_MODE4_END = [".", ".", ".", ".", "."]

# CoReS utils/utils.py:39-58 ANSWER_LIST (its other lists are LISA's, lines 17-37)
CORES_ANSWER_LIST = [
    "It appears on [SEG_SEMA]. It is [SEG].",
    "It usually appears on [SEG_SEMA]. It is [SEG].",
    "It typically appears on [SEG_SEMA]. It is [SEG].",
    "We can usually find it on [SEG_SEMA]. It is [SEG].",
    "It is usually found on [SEG_SEMA]. It is [SEG].",
    "It appears on [SEG_SEMA]. The segmentation result is [SEG].",
    "It usually appears on [SEG_SEMA]. The segmentation result is [SEG].",
    "It typically appears on [SEG_SEMA]. The segmentation result is [SEG].",
    "We can usually find it on [SEG_SEMA]. The segmentation result is [SEG].",
    "Sure, we can usually find it on [SEG_SEMA]. It is [SEG].",
    "Sure, it usually appears on [SEG_SEMA]. It is [SEG].",
    "Sure, it typically appears on [SEG_SEMA]. It is [SEG].",
    "Sure, it appears on [SEG_SEMA]. It is [SEG].",
    "Sure, it is typically found on [SEG_SEMA]. It is [SEG].",
    "Sure, we can usually find it on [SEG_SEMA]. The segmentation result is [SEG].",
    "Sure, it usually appears on [SEG_SEMA]. The segmentation result is [SEG].",
    "Sure, it typically appears on [SEG_SEMA]. The segmentation result is [SEG].",
    "Sure, it appears on [SEG_SEMA]. The segmentation result is [SEG].",
]
# CoReS utils/dataset.py:482,493 (ValDataset): the answer of every validation conversation
CORES_VALIDATION_ANSWER = "It usually appears on [SEG_SEMA]. It is [SEG]."
