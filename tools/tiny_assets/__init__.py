"""Writers of the tiny synthetic datasets: every data family in its real on-disk layout,
drawn from shapes-world scenes (`utils.shapes_world`). `tools/make_tiny_assets.py` runs them."""
