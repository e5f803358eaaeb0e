"""Defaults that `jamba --help` shows and the library applies. They live here, not beside their users, so
that --help reads them without importing what those modules import (quant.py imports torch)."""

MAX_TOKENS = 512  # most new tokens when neither the caller nor generation_config.json says
INT8_SKIP = ("mamba", "router", "lm_head")  # modules 8-bit and 4-bit loading leave in 16-bit (see quant.py)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: activation columns above it stay in 16-bit
