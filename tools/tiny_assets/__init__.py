"""Writers of the tiny synthetic datasets: every data family in its real on-disk layout,
drawn from shapes-world scenes (`shapes_world.py`, texts in `shapes_world_text.py`).
`tools/make_tiny_assets.py` runs them."""
