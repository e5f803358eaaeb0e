"""Defaults that `jamba --help` shows and the library applies, kept where the CLI can read them without
importing torch (their owner, quant.py, imports it; `jamba --help` must stay fast)."""

INT8_SKIP = ("mamba", "router", "lm_head")  # modules 8-bit and 4-bit loading leave in 16-bit (see quant.py)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: activation columns above it stay in 16-bit
