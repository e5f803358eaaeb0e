"""The model's own text on a terminal: escape sequences it spells are shown, not acted on; piped, its bytes
are left as they are."""

import json
import shutil
import subprocess

import pytest
import torch

from helpers import ROOT, Terminal, jamba

pytestmark = pytest.mark.slow  # real processes on a terminal
ESC = 0x1B


@pytest.fixture(scope="module")
def esc_model(checkpoints, tmp_path_factory):
    """The `top1` checkpoint with its lm_head rows swapped so that greedy decoding's first token is the byte
    ESC: the logit the first token had now belongs to ESC's token."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    from jamba_cli.loader import load

    source = checkpoints["top1"][0]
    model, tokenizer = load(source, dtype="fp32", device="cpu")
    ids = torch.tensor([tokenizer.encode("To be, or not")])
    with torch.no_grad():
        first = int(model(ids)[0, -1].argmax())
    assert _byte_symbol(ESC) in ByteLevel.alphabet()  # one symbol per byte, ESC's among them
    esc_id = Tokenizer.from_file(str(source / "tokenizer.json")).token_to_id(_byte_symbol(ESC))
    assert esc_id is not None and esc_id != first
    target = tmp_path_factory.mktemp("esc")
    for f in source.iterdir():
        shutil.copy(f, target / f.name)
    weights = load_file(str(target / "model.safetensors"))
    head = weights["lm_head.weight"].clone()
    head[[first, esc_id]] = head[[esc_id, first]]
    weights["lm_head.weight"] = head
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _byte_symbol(byte: int) -> str:
    # GPT-2's byte-to-unicode table, which the ByteLevel pre-tokenizer uses
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return chr(byte) if byte in printable else chr(256 + extra.index(byte))


def test_escape_bytes_from_the_model_are_inert_on_a_terminal_and_kept_in_a_pipe(esc_model, env):
    args = jamba("run", "-m", esc_model, "--raw", "-n", "1", "--seed", "0", "To be, or not")
    piped = subprocess.run(args, capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == b"\x1b\n"  # a pipe or a file gets the bytes the model wrote
    # stdout alone on the terminal (stderr, where a progress bar may draw, elsewhere)
    term = Terminal(["sh", "-c", 'exec "$@" 2>/dev/null', "sh", *args], env)
    seen = term.expect(b"\\x1b", timeout=120)  # shown as text ...
    assert term.close() == 0
    assert b"\x1b" not in seen + term.seen  # ... and never as the byte a terminal acts on
    as_json = subprocess.run([*args, "--format", "json"], capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert json.loads(as_json.stdout)["text"] == "\x1b"
