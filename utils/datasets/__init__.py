"""Dataset families: one module per family, the weighted mixer and the validation sets."""
