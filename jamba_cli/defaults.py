"""Defaults that `jamba --help` shows and the library applies. They live here, not beside their users, so
that the CLI reads them without importing what those modules import (loader.py and quant.py import torch)."""

from pathlib import Path

MAX_TOKENS = 512  # most new tokens when neither the caller nor generation_config.json says
INT8_SKIP = ("mamba", "router", "lm_head")  # modules 8-bit and 4-bit loading leave in 16-bit (see quant.py)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: activation columns above it stay in 16-bit
BUNDLED_MODEL = "jamba-tiny-shakespeare"  # trained by tools/train_tiny.py, shipped in the wheel


def bundled_model_dir() -> Path | None:
    """The directory of the small Jamba shipped with the package (the default model), or None in a build
    that leaves it out."""
    directory = Path(__file__).resolve().parent / "assets" / BUNDLED_MODEL
    return directory if (directory / "config.json").is_file() else None
