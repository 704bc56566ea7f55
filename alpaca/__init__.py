"""alpaca: the package behind the top-level scripts (data, prompts, models, training, exports)."""

__version__ = "0.1.0"
