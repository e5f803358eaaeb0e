"""Where each weight of a model built on the meta device goes, and its memory: the device map resolved
(devices.py), the modules to quantize swapped for bitsandbytes ones (quant.py), then each parameter allocated
on its device, memory-mapped in a private offload folder (offload.py), or staged in full precision and
quantized once all of its bytes are in. Nothing is allocated until the whole plan checks out."""

from __future__ import annotations

import contextlib
import os

import torch

from . import devices, offload, quant
from .config import JambaConfig
from .errors import DeviceMapError, JambaError
from .model import JambaForCausalLM


def default_dtype(config: JambaConfig, device: torch.device) -> torch.dtype:
    """bf16 on accelerators; on CPU fp32 (faster and exact there) unless it would not fit comfortably."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float16
    params = approx_params(config)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 0
    return torch.float32 if avail == 0 or params * 4 < 0.5 * avail else torch.bfloat16


def approx_params(c: JambaConfig) -> int:
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = sum(mlp * (c.num_experts if c.is_moe(i) else 1) for i in range(c.num_hidden_layers))
    return per_layer + 2 * c.vocab_size * c.hidden_size


class Placer:
    """Gives each parameter of a meta model its memory: allocated on its device, memory-mapped in a private
    directory of the offload folder (the OS pages it in from disk when it runs on the CPU), or, for a
    quantized weight, a full-precision staging buffer on its device that is quantized once it is filled."""

    def __init__(self, model: JambaForCausalLM, where: dict[str, str], dtype: torch.dtype,
                 quantized: set[str], offload_folder: str | os.PathLike | None, own_dtype: set[str] = frozenset()):
        self.model, self.where, self.dtype, self.quantized = model, where, dtype, quantized
        self.own_dtype = own_dtype  # parameters allocated in their own dtype (8-bit weights, their scales)
        self.offload_dir = None
        if "disk" in where.values():
            try:
                self.offload_dir = offload.make_folder(offload_folder)
            except OSError as e:
                raise JambaError(f"cannot use offload folder {offload_folder}: {e.strerror}") from None
        self.staged: dict[str, list] = {}  # weight name -> [buffer, elements still to come]

    def allocate(self) -> None:
        for name, p in list(self.model.named_parameters()):
            if name in self.own_dtype:
                _set_param(self.model, name, torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=self.where[name]), requires_grad=False))
            elif name not in self.quantized:
                device = self.where[name]
                t = self._mapped(name, p.shape) if device == "disk" else \
                    torch.empty(p.shape, dtype=self.dtype, device=device)
                _set_param(self.model, name, torch.nn.Parameter(t, requires_grad=False))
        if self.model.config.tie_word_embeddings:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self.params = dict(self.model.named_parameters())

    def target8(self, name: str, index: tuple = ()) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the part `index` of parameter `name` (unquantized naming) goes when it comes as float8 with
        its row scales and its module keeps float8 weights: (8-bit weight, row scales) to read into directly;
        else None (the weight is then widened and written through `target`)."""
        base, _, kind = name.rpartition(".")
        module = self.model.get_submodule(base)
        if getattr(module, "weight_format", None) != "fp8":
            return None
        if kind == "weight":
            return module.weight.data[index], module.weight_scale.data[index]
        scale = module.gate_up_scale if kind == "gate_up_proj" else module.down_scale
        return getattr(module, kind).data[index], scale.data[index]

    def target(self, name: str, index: tuple = ()) -> torch.Tensor:
        """The tensor to write the part `index` of parameter `name` (unquantized naming) into."""
        name, index = self._locate(name, index)
        if name not in self.quantized:
            return self.params[name].data[index]
        if name not in self.staged:
            # one expert of stacked 8-bit experts is staged alone: `...experts.gate_up_proj.3`
            shape = self.params[name].shape if name in self.params else self.params[name.rpartition(".")[0]].shape[1:]
            device = self.where[name] if name in self.where else self.where[name.rpartition(".")[0]]
            self.staged[name] = [torch.empty(shape, dtype=self.dtype, device=device), shape.numel()]
        return self.staged[name][0][index]

    def written(self, name: str, index: tuple, numel: int) -> None:
        """Note that `numel` elements of `name` were written; a completed quantized weight is quantized."""
        name, _ = self._locate(name, index)
        if name in self.staged:
            self.staged[name][1] -= numel
            if self.staged[name][1] == 0:
                quant.quantize(self.model, name, self.staged.pop(name)[0])

    def finish(self) -> JambaForCausalLM:
        self.close()
        self.model.eval()
        return self.model

    def close(self) -> None:
        # the mapped files stay usable after unlinking; their space is freed when the process exits
        if self.offload_dir is not None:
            offload.remove(self.offload_dir)

    def _locate(self, name: str, index: tuple) -> tuple[str, tuple]:
        # expert e of a stacked parameter is staged alone: its own linear with bitsandbytes (quant.QuantExperts),
        # one slice of the stacked 8-bit weight with ours (quant8.Experts8)
        base, _, kind = name.rpartition(".")
        if kind in ("gate_up_proj", "down_proj") and index:
            for staged in (f"{base}.{kind.removesuffix('_proj')}.{index[0]}.weight", f"{name}.{index[0]}"):
                if staged in self.quantized:
                    return staged, index[1:]
        return name, index

    def _mapped(self, name: str, shape: torch.Size) -> torch.Tensor:
        path = self.offload_dir / f"{name}.bin"
        try:
            with open(path, "wb") as f:
                size = shape.numel() * self.dtype.itemsize
                if hasattr(os, "posix_fallocate"):  # reserve the blocks: a full disk fails here, not as SIGBUS later
                    os.posix_fallocate(f.fileno(), 0, size)
                else:
                    f.truncate(size)
        except OSError as e:
            raise JambaError(f"cannot offload {name} to {self.offload_dir.parent}: {e.strerror}") from None
        return torch.from_file(str(path), shared=True, size=shape.numel(), dtype=self.dtype).view(shape)


def place(model: JambaForCausalLM, *, dtype: torch.dtype | None = None, device=None, device_map=None,
          max_memory: dict | str | None = None, offload_folder: str | os.PathLike | None = None,
          quant_config: quant.QuantConfig | None = None) -> Placer:
    """Decide where each parameter of a meta-device model goes and swap in quantized modules (on meta).

    Nothing is allocated: call `allocate()` on the result, then write each weight through `target`/`written`.
    """
    if device is not None and device_map is not None:
        raise DeviceMapError("pass either `device` or `device_map`, not both")
    if offload_folder is not None:
        offload.sweep(offload_folder)  # what a killed load left behind
    budget = devices.parse_max_memory(max_memory) if isinstance(max_memory, str) else \
        devices.budget_bytes(max_memory) if max_memory else None
    if device_map is None:  # a budget alone asks for a planned map
        device_map = device or ("auto" if budget else "cuda" if torch.cuda.is_available() else "cpu")
    targets = quant.targets(model, quant_config) if quant_config else {}
    special = {w: quant.weight_dtype(quant_config) for ws in targets.values() for w in ws}
    automatic = isinstance(device_map, str) and device_map in devices.AUTO_MAPS
    if automatic:
        dtype = dtype or default_dtype(model.config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        device_map = devices.automatic(model, device_map, budget, dtype, special)
    else:
        device_map = devices.explicit(model, device_map, "`device`" if device is not None else "`device_map`")
    first = torch.device(next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu"))
    dtype = dtype or default_dtype(model.config, first)
    if quant_config:
        quant_config = quant_config.resolved(first)
        if quant_config is None:  # an FP8 checkpoint on the CPU: its weights are widened as they load
            targets = {}
    where = devices.assign(model, device_map)
    if budget or automatic or "disk" in where.values():  # (a plain device needs no accelerate import)
        from accelerate.utils import dtype_byte_size

        sizes = {name: p.numel() * dtype_byte_size(special.get(name, dtype)) for name, p in model.named_parameters()}
        devices.check_budget(sizes, where, budget, offload_folder, automatic)
    quantized, own_dtype = set(), set()
    if targets:
        names = [m for m, ws in targets.items() if where[ws[0]] != "disk"]  # offloaded weights stay full precision
        with _no_init():
            quantized, own_dtype = quant.swap(model, names, quant_config, compute_dtype=dtype)
        where = devices.assign(model, device_map)
    placer = Placer(model, where, dtype, quantized, offload_folder, own_dtype)
    placer.quant_config = quant_config  # as resolved for the device
    return placer


@contextlib.contextmanager
def _no_init():
    """Skip parameter init while building on meta: its values are overwritten anyway, and the first compute
    op on a meta tensor imports torch's Python decompositions (sympy and more), which then stay in memory for
    good: they would count in the peak RSS that `benchmarks/bench_load.py` tracks (results/load_cpu.json)."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _set_param(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)
