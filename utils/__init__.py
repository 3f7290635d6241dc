"""Data pipeline, metrics and training helpers.

Kept light on import: submodules are imported where they are used.
"""
