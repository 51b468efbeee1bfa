"""tfb_core: Training-Free Bayesianization of LoRA adapters (no web imports)."""

__version__ = "0.1.0"
