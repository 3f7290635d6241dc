"""The model package: LLaVA backbone, SAM, tokens, losses, LoRA and the segmenter.

Kept light on import: submodules are imported where they are used.
"""
