"""The fingerprint of a loaded model: what binds a prompt cache file to the weights that made it.

A checksum of the config and of every byte of every weight, as the model holds them (dtype and any
quantization included), computed where the weights are and remembered per loaded model.
"""

from __future__ import annotations

import hashlib
import json
import struct
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .model import JambaForCausalLM

_WORDS = 1 << 20  # int64 words per checksum row: 8 MB of weights
_BLOCK = 2 * 8 * _WORDS  # bytes summed at a time: bounded temporaries
_coefficients: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model: JambaForCausalLM) -> str:
    """A hash of the config and of every byte of every weight, as the model holds them (the dtype and any
    quantization included), wherever they live: the same weights give the same value on any device.

    The bytes of each weight, read as int64 words w, are summed in rows of 8 MB as Σ w_j·c_j mod 2^64 with
    fixed odd pseudo-random c_j, once as they lie and once shifted by 4 bytes (with other c_j); the row sums,
    names, shapes and dtypes then go through SHA-256. A weight that differs in one value always changes the
    fingerprint. Weights that differ otherwise give the same one by a chance of at most about 2^-32 (the
    shifted sums put every bit in the lower half of a word in one of the two), unless made to on purpose:
    this is a checksum, not a signature, and a file can claim any fingerprint, which is why everything in a
    file is checked before use. The sums run where the weights are, at memory speed: a GPU needs no copy
    of them. Computed once per loaded model.
    """
    import torch

    key = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in model.parameters())
    known = _fingerprints.get(model)
    if known is not None and known[0] == key:
        return known[1]
    h = hashlib.sha256(b"jamba-fingerprint/2\0")
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digests: dict[tuple, bytes] = {}  # a tied weight is summed once
    scratch: dict[torch.device, torch.Tensor] = {}  # one aligned buffer per device, reused for every weight
    with torch.inference_mode():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            t = t.detach()
            h.update(f"\0{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
            ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.device)
            if ident not in digests:
                digests[ident] = _checksum(t, scratch)
            h.update(digests[ident])
    value = h.hexdigest()[:32]
    _fingerprints[model] = (key, value)
    return value


def _checksum(t: torch.Tensor, scratch: dict) -> bytes:
    import ctypes

    import torch

    if t.device.type == "meta" or t.numel() == 0:
        return b""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    if raw.data_ptr() % 8:
        raw = raw.clone()  # int64 words need 8-byte alignment
    if t.device not in _coefficients:
        i = torch.arange(2 * _WORDS, dtype=torch.int64, device=t.device) * -7046029254386353131  # wraps mod 2^64
        _coefficients[t.device] = ((i ^ (i >> 31)) | 1).chunk(2)
    plain, shifted = _coefficients[t.device]
    if t.device not in scratch:
        scratch[t.device] = torch.empty(_BLOCK, dtype=torch.uint8, device=t.device)
    out = []
    for start in range(0, raw.numel(), _BLOCK):
        out.append(_sums(raw[start:start + _BLOCK], plain))
        # the same bytes 4 further on: a change in the high half of a word lies in a low half here, where a
        # sum mod 2^64 sees it more surely (two sign flips in the top bits of two words cancel in the first);
        # copied to be 8-byte aligned (on the CPU by memmove, several times faster than torch's copy here)
        seg = raw[start + 4:start + 4 + _BLOCK]
        aligned = scratch[t.device][:seg.numel()]
        if t.device.type == "cpu":
            ctypes.memmove(aligned.data_ptr(), seg.data_ptr(), seg.numel())
        else:
            aligned.copy_(seg)
        out.append(_sums(aligned, shifted))
    return b"".join(out)


def _sums(raw: torch.Tensor, c: torch.Tensor) -> bytes:
    """The row sums of the whole int64 words in the bytes `raw` (8-byte aligned), then the bytes left over."""
    import torch

    whole = raw.numel() // 8
    words = raw[:whole * 8].view(torch.int64)
    full = whole // _WORDS * _WORDS
    parts = []
    if full:
        parts.append(_row_sums(words[:full].view(-1, _WORDS), c))
    if full < whole:
        parts.append(_row_sums(words[full:][None], c[:whole - full]))
    sums = [int(x) for part in parts for x in part.tolist()]
    return struct.pack(f"<{len(sums)}q", *sums) + bytes(raw[whole * 8:].tolist())


def _row_sums(rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # int64 products and sums wrap mod 2^64 on every device, so the order of the additions does not matter
    # and CPU and GPU agree; the CPU's integer matrix-vector product reads each word once, while the GPU has
    # no integer matmul and multiplies, then sums
    return rows @ c if rows.device.type == "cpu" else (rows * c).sum(1)
