"""FP8 checkpoints in the compressed-tensors layout (what llm-compressor writes and vLLM loads, e.g. AI21's
`*-FP8` releases): the `quantization_config` of config.json, which modules it quantizes, and the tensors
those modules bring on disk. Imported only when config.json has a `quantization_config`: the bf16 path never
pays for it, and the `compressed-tensors` package is not needed (its pydantic models would cost more than
the few keys read here).

The layout, as established from the sources (compressed-tensors at github.com/vllm-project/compressed-tensors,
formerly neuralmagic/compressed-tensors: src/compressed_tensors/quantization/{quant_config,quant_args,
quant_scheme}.py, quantization/lifecycle/initialize.py, compressors/naive_quantized/base.py,
compressors/model_compressors/model_compressor.py, utils/match.py; vLLM's reader at github.com/vllm-project/
vllm vllm/model_executor/layers/quantization/compressed_tensors/utils.py; llm-compressor's examples
github.com/vllm-project/llm-compressor examples/quantizing_moe):

- config.json["quantization_config"] is the QuantizationConfig dumped with sorted keys: `quant_method`
  "compressed-tensors", `format` (how tensors are stored: "float-quantized" for fp8 weights *and* fp8
  activations, "naive-quantized" for fp8 weight-only -- both store the same tensors; "mixed-precision" when
  groups differ, each group then carries its own `format`), `config_groups` {name: scheme}, `ignore`,
  `kv_cache_scheme` (null unless the KV cache is quantized, which adds k_scale/v_scale tensors),
  `quantization_status` ("compressed"), `global_compression_ratio`, `sparsity_config` ({}),
  `transform_config` ({}; rotations such as Hadamard transforms when set), `version`.
- A scheme is {targets, weights, input_activations, output_activations, format}; targets are class names
  ("Linear" = every torch.nn.Linear), exact module names, or "re:" regular expressions. A group may also be
  a preset name mapped to its targets ({"FP8_DYNAMIC": ["Linear"]}), expanded by the library.
- weights / input_activations are QuantizationArgs: num_bits (default 8), type ("int" by default, "float"
  for fp8, which is always e4m3 at 8 bits), symmetric (default true), strategy ("tensor", "channel",
  "group", "block", "token", ...; when absent, inferred from group_size: none -> tensor, -1 -> channel,
  > 0 -> group), group_size, block_structure ([rows, cols]), dynamic (true, false or "local"), actorder,
  observer, observer_kwargs, scale_dtype, zp_dtype. Presets: FP8 = tensor weights + static per-tensor
  activations; FP8_DYNAMIC = channel weights + dynamic per-token activations; FP8_BLOCK = 128x128 blocks.
- On disk, per quantized module M (an nn.Linear): `M.weight` F8_E4M3 (N, K) and `M.weight_scale` in the
  dtype of the original weight (BF16 for a bf16 model; F32 from older tools), shape (1,) for "tensor",
  (N, 1) for "channel" ((N, K/g) for group, (ceil(N/bn), ceil(K/bk)) for block). Static activations add
  `M.input_scale` (1,). Zero points of symmetric schemes are dropped at save time (`weight_zero_point`
  exists only for asymmetric ones); biases stay as they were. Dequantized weight = weight * scale.
- Matching (utils/match.py `match_name`, and vLLM's own `_is_equal_or_regex_match`): an entry "re:P" matches
  a module name when `re.match(P, name)` does (anchored at the start only, so "re:.*router" also matches
  "...router.x"); any other entry matches only the exact full module name (a parent's name does not cover
  its children). Ignore entries are tested against the quantized module itself.
- The ignore list that llm-compressor saves is not the recipe's: `QuantizationConfig.from_pretrained`
  replaces it with the exact name of every module of a targeted class left unquantized (for Jamba with the
  recipe `ignore=["lm_head", "re:.*mamba.*", "re:.*router"]`: every mamba in/x/dt/out_proj, every router and
  lm_head). Hand-written configs keep "re:" entries. Both are honoured here.
- For Jamba, "Linear" covers attention q/k/v/o_proj, dense MLP and every expert's gate/up/down_proj (experts
  are separate Linear modules: `model.layers.N.feed_forward.experts.E.gate_proj`), the MoE `router`, the
  mamba mixer's in_proj, x_proj, dt_proj and out_proj, and lm_head; not conv1d, norms or embeddings. vLLM's
  Jamba never quantizes the router; the model card asks for Mamba in 16 bits: both are usually ignored.

What is not read here is refused in one line naming the key: other quant methods ("fp8" of transformers'
FineGrainedFP8, "bitsandbytes", "gptq", ...), int or 4-bit weights, group/block strategies (our kernels take
one scale per output row), asymmetric or dynamic weights, activation ordering, output activations, a
quantized KV cache, sparsity and transforms. Static input scales are accepted and not used: the 8-bit path
quantizes activations itself, per token and per step, which needs no calibrated scale and is at least as
precise as the one per-tensor scale the checkpoint carries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from .checkpoint_files import shown
from .checkpoint_files import value as shown_value
from .errors import CheckpointError, ConfigError

QUANT_METHOD = "compressed-tensors"
FORMATS = ("float-quantized", "naive-quantized")  # the same tensors on disk (see above)
STRATEGIES = ("tensor", "channel")
FP8_MAX = 448.0  # the largest float8_e4m3fn

# Jamba's torch.nn.Linear modules, by the last part of their name: what the target "Linear" covers.
LINEAR_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router",
                          "in_proj", "x_proj", "dt_proj", "out_proj", "lm_head"})

# The library's FP8 presets, for a config group given as {preset: targets}: (weight strategy, static input).
_PRESETS = {"FP8": ("tensor", True), "FP8_DYNAMIC": ("channel", False)}

_SCALE_DTYPES = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class FP8Group:
    """One config group: the modules it targets and how their weights are scaled."""

    name: str
    targets: tuple[str, ...]
    strategy: str  # "tensor" or "channel"
    static_input: bool  # its modules carry an `input_scale` (not used: activations are scaled per token)


class FP8Tensors(NamedTuple):
    """The on-disk tensors of one quantized module; `input_scale` may be absent (it is, for dynamic
    activations) and is never used."""

    weight: str
    weight_scale: str
    input_scale: str


@dataclass(frozen=True)
class FP8Scheme:
    """A compressed-tensors FP8 config, as far as loading it goes: which modules hold fp8 weights, and with
    which scales. Module names are those of the checkpoint (`model.layers.3.mamba.in_proj`, `lm_head`)."""

    format: str
    groups: tuple[FP8Group, ...]
    ignore: tuple[str, ...]

    def group(self, module_name: str) -> FP8Group | None:
        """The group that quantizes `module_name`, or None: a Linear module matched by a group's targets
        (the first such group) and by no ignore entry."""
        if module_name.rsplit(".", 1)[-1] not in LINEAR_NAMES:
            return None
        if any(_matches(module_name, entry) for entry in self.ignore):
            return None
        for group in self.groups:
            if any(_matches(module_name, target) for target in group.targets):
                return group
        return None

    def quantized(self, module_name: str) -> bool:
        """Whether the checkpoint holds `module_name`'s weight in fp8 (with a `weight_scale`)."""
        return self.group(module_name) is not None

    def strategy(self, module_name: str) -> str | None:
        """"tensor" or "channel" for a quantized module, None for one kept in 16 bits."""
        group = self.group(module_name)
        return group.strategy if group else None

    def tensor_names(self, module_name: str) -> FP8Tensors:
        """The tensors a quantized module brings: weight (fp8), weight_scale, and optionally input_scale."""
        return FP8Tensors(f"{module_name}.weight", f"{module_name}.weight_scale", f"{module_name}.input_scale")

    def check(self, module_name: str, weight, weight_scale, input_scale=None) -> str:
        """Validate the header entries (anything with `.dtype` and `.shape`, e.g. safetensors_header's
        TensorEntry) of a quantized module's tensors; raises CheckpointError naming the tensor. Returns the
        strategy, which says how `to_row_scale` broadcasts the scale: "tensor", one value for every row;
        "channel", one per row."""
        import torch

        strategy = self.strategy(module_name)
        if strategy is None:
            raise CheckpointError(f"{shown(module_name)} is not quantized in this checkpoint's "
                                  f"quantization_config, but has a weight_scale")
        names = self.tensor_names(module_name)
        if weight.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{shown(names.weight)} has dtype {_dtype_name(weight.dtype)}; the "
                                  f"quantization_config makes it F8_E4M3")
        if len(weight.shape) != 2:
            raise CheckpointError(f"{shown(names.weight)} has shape {list(weight.shape)}; an fp8 weight is 2-D")
        check_scale_shape(names.weight_scale, weight_scale, strategy, weight.shape[0])
        if input_scale is not None:
            _check_scale_dtype(names.input_scale, input_scale)
            if tuple(input_scale.shape) not in ((), (1,)):
                raise CheckpointError(f"{shown(names.input_scale)} has shape {list(input_scale.shape)}; "
                                      f"a static input scale is [1]")
        return strategy


def check_scale_shape(name: str, scale, strategy: str, n_rows: int) -> None:
    """Raise CheckpointError, naming the tensor `name`, unless `scale` (an entry with .dtype and .shape) is
    a float scale of `strategy` for a weight of `n_rows` output rows."""
    _check_scale_dtype(name, scale)
    shape = tuple(scale.shape)
    if strategy == "tensor":
        if shape not in ((), (1,)):
            raise CheckpointError(f"{shown(name)} has shape {list(shape)}; a per-tensor scale is [1]")
    elif shape not in ((n_rows, 1), (n_rows,)):
        raise CheckpointError(f"{shown(name)} has shape {list(shape)}; per-channel scales of a weight "
                              f"with {n_rows} rows are [{n_rows}, 1]")


def to_row_scale(scale, n_rows: int):
    """The scale as one float32 per output row, (n_rows,): a per-tensor scale repeated, a per-channel
    (N, 1) one flattened."""
    import torch

    scale = scale.detach().to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(1).expand(n_rows).contiguous()
    if tuple(scale.shape) in ((n_rows, 1), (n_rows,)):
        return scale.reshape(n_rows).contiguous()
    raise CheckpointError(f"a scale of shape {list(scale.shape)} gives no scale per row of {n_rows}")


def dequantize(weight_fp8, scale):
    """The reference: weight * scale in float32, for per-tensor or per-channel scales."""
    import torch

    return weight_fp8.to(torch.float32) * to_row_scale(scale, weight_fp8.shape[0])[:, None]


def scheme_from_config(config_dict: dict, source: str) -> FP8Scheme | None:
    """The FP8 scheme of a parsed config.json, None when it has no `quantization_config`; ConfigError (one
    line naming `source` and the key) for any quantization this package does not load."""
    qc = config_dict.get("quantization_config")
    if qc is None:
        return None
    where = f"{source}: " if source else ""

    def refuse(key: str, value, supported: str):
        return ConfigError(f"{where}key 'quantization_config{key}' is {shown_value(value)}; {supported}")

    if not isinstance(qc, dict):
        raise refuse("", qc, "it must be an object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise refuse(".quant_method", method, f"jamba-cli reads quantized checkpoints only in the "
                                              f"{QUANT_METHOD} FP8 layout (quant_method '{QUANT_METHOD}')")
    fmt = qc.get("format")
    if fmt not in (*FORMATS, "mixed-precision"):
        raise refuse(".format", fmt, f"supported: {_either(FORMATS)}")
    # Everything else changes what the tensors on disk mean; none of it is produced by an FP8 export.
    if qc.get("kv_cache_scheme") is not None:
        raise refuse(".kv_cache_scheme", qc["kv_cache_scheme"], "a quantized KV cache is not supported "
                                                                "(it must be null)")
    sparsity = qc.get("sparsity_config")
    if sparsity and (not isinstance(sparsity, dict) or sparsity.get("format") not in (None, "dense")):
        raise refuse(".sparsity_config", sparsity, "sparse checkpoints are not supported (it must be {})")
    transform = qc.get("transform_config")
    if transform and (not isinstance(transform, dict) or transform.get("config_groups")):
        raise refuse(".transform_config", transform, "transformed weights are not supported (it must be {})")
    # quantization_status is not checked: the weights' dtype on disk is, module by module.

    groups_in = qc.get("config_groups")
    if not isinstance(groups_in, dict) or not groups_in:
        raise refuse(".config_groups", groups_in, "it must map group names to schemes")
    groups = tuple(_group(str(name), scheme, fmt, refuse) for name, scheme in groups_in.items())

    ignore = qc.get("ignore")
    if ignore is None:
        ignore = []
    if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
        raise refuse(".ignore", ignore, "it must be a list of module names and 're:' patterns")
    for i, entry in enumerate(ignore):
        _compile(entry, f".ignore[{i}]", refuse)
    return FP8Scheme(format=fmt, groups=groups, ignore=tuple(ignore))


def _group(name: str, scheme: Any, fmt: str, refuse) -> FP8Group:
    key = f".config_groups.{name}"
    if isinstance(scheme, list):  # {preset name: targets}
        if name not in _PRESETS:
            raise refuse(f"{key}", scheme, f"a preset must be one of {_either(_PRESETS)}")
        targets = _targets(scheme, f"{key}", refuse)
        strategy, static_input = _PRESETS[name]
        return FP8Group(name, targets, strategy, static_input)
    if not isinstance(scheme, dict):
        raise refuse(key, scheme, "it must be a scheme object")
    group_format = scheme.get("format")
    if fmt == "mixed-precision" or group_format is not None:
        if group_format not in FORMATS:
            raise refuse(f"{key}.format", group_format, f"supported: {_either(FORMATS)}")
    targets = _targets(scheme.get("targets"), f"{key}.targets", refuse)
    if scheme.get("output_activations") is not None:
        raise refuse(f"{key}.output_activations", scheme["output_activations"], "it must be null")
    weights = scheme.get("weights")
    if not isinstance(weights, dict):
        raise refuse(f"{key}.weights", weights, "jamba-cli reads FP8 weights (type 'float', num_bits 8)")
    strategy = _weights(weights, f"{key}.weights", refuse)
    return FP8Group(name, targets, strategy, _static_input(scheme.get("input_activations"),
                                                           f"{key}.input_activations", refuse))


def _weights(args: dict, key: str, refuse) -> str:
    # defaults as in compressed-tensors' QuantizationArgs
    if args.get("type", "int") != "float":
        raise refuse(f"{key}.type", args.get("type", "int"), "jamba-cli reads FP8 weights (type 'float')")
    if args.get("num_bits", 8) != 8:
        raise refuse(f"{key}.num_bits", args["num_bits"], "jamba-cli reads 8-bit float (e4m3) weights")
    if args.get("symmetric", True) is not True:
        raise refuse(f"{key}.symmetric", args["symmetric"], "FP8 weights are symmetric (true)")
    if args.get("dynamic", False) is not False:
        raise refuse(f"{key}.dynamic", args["dynamic"], "weights are scaled statically (false)")
    if args.get("actorder") not in (None, False, "weight", "static"):  # "weight" reorders only calibration
        raise refuse(f"{key}.actorder", args["actorder"], "activation-ordered groups are not supported (null)")
    strategy, group_size = args.get("strategy"), args.get("group_size")
    if strategy is None:  # the library's inference
        strategy = {None: "tensor", -1: "channel"}.get(group_size, "group")
    if strategy not in STRATEGIES:
        raise refuse(f"{key}.strategy", strategy, f"supported: {_either(STRATEGIES)} "
                                                  f"(one scale per weight or per output row)")
    if group_size not in (None, -1):
        raise refuse(f"{key}.group_size", group_size, f"it must be null with strategy '{strategy}'")
    if args.get("block_structure") is not None:
        raise refuse(f"{key}.block_structure", args["block_structure"], "block scales are not supported (null)")
    return strategy


def _static_input(args, key: str, refuse) -> bool:
    """Whether the group's modules carry a static `input_scale`: accepted, and not used (see the module's
    docstring); dynamic activation settings need no tensor and are ignored likewise."""
    if args is None:
        return False
    if not isinstance(args, dict):
        raise refuse(key, args, "it must be an object or null")
    dynamic = args.get("dynamic", False)
    if dynamic is True:
        return False
    strategy = args.get("strategy") or {None: "tensor"}.get(args.get("group_size"), "group")
    if dynamic is not False or strategy != "tensor":
        raise refuse(f"{key}.strategy" if dynamic is False else f"{key}.dynamic",
                     strategy if dynamic is False else dynamic,
                     "supported: dynamic activations, or static per-tensor ('tensor') input scales")
    return True


def _targets(targets, key: str, refuse) -> tuple[str, ...]:
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise refuse(key, targets, "it must be a list of 'Linear', module names and 're:' patterns")
    for i, target in enumerate(targets):
        if _is_class_name(target) and target != "Linear":
            raise refuse(f"{key}[{i}]", target, "the only module class jamba-cli quantizes is 'Linear'")
        _compile(target, f"{key}[{i}]", refuse)
    return tuple(targets)


def _compile(entry: str, key: str, refuse) -> None:
    if entry.startswith("re:"):
        try:
            _regex(entry[3:])
        except re.error as e:
            raise refuse(key, entry, f"not a valid regular expression ({e})") from None


_REGEX_CACHE: dict[str, re.Pattern] = {}


def _regex(pattern: str) -> re.Pattern:
    compiled = _REGEX_CACHE.get(pattern)
    if compiled is None:
        compiled = _REGEX_CACHE[pattern] = re.compile(pattern)
    return compiled


def _matches(module_name: str, entry: str) -> bool:
    """compressed-tensors' rule (utils/match.py): "re:P" when re.match(P, name) matches (anchored at the
    start, not at the end), "Linear" for every Linear module (the callers only ask about those), anything
    else only the exact full name."""
    if entry.startswith("re:"):
        return _regex(entry[3:]).match(module_name) is not None
    return entry == "Linear" or entry == module_name


def _is_class_name(target: str) -> bool:
    return target.isidentifier() and target[:1].isupper()


def _either(options) -> str:
    options = [f"'{o}'" for o in options]
    return " or ".join(options) if len(options) <= 2 else ", ".join(options[:-1]) + f" or {options[-1]}"


def _check_scale_dtype(name: str, entry) -> None:
    dtype = _dtype_name(entry.dtype)
    if dtype not in _SCALE_DTYPES:
        raise CheckpointError(f"{shown(name)} has dtype {dtype}; a scale is {', '.join(_SCALE_DTYPES)}")


def _dtype_name(dtype) -> str:
    from .safetensors_header import _DTYPE_NAMES

    return _DTYPE_NAMES.get(dtype, str(dtype))
