"""Corpus side of the bundled model: the train/validation split, the play's speeches as dialogues, the
tokenizer (Llama/Jamba-style BPE pieces with Jamba's special tokens) and its Jamba 1.5+ chat template.

Run as a script to write the held-out excerpt that the tests use:
    python tools/tiny_corpus.py excerpt /work/shared/data/tinyshakespeare.txt tests/data/shakespeare_val.txt
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# a git-ignored copy next to the scripts, or the project's shared data folder (inside or beside the checkout)
CORPUS_PLACES = [_ROOT / "tools" / "data", _ROOT / "shared" / "data", _ROOT.parent / "shared" / "data"]
VAL_FRACTION = 0.1
EXCERPT_BYTES = 16_000

# Ids 0-2 are Jamba's; the chat tokens follow in the order of the Jamba 1.5 vocabulary.
SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|bom|>", "<|eom|>", "<|system|>", "<|user|>",
            "<|assistant|>"]
PAD, BOS, EOS, BOM, EOM = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|bom|>", "<|eom|>"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# Jamba 1.5+ format: BOS, a system block (empty by default), then <|eom|><|bom|><|role|> content per turn;
# the generation prompt ends in <|assistant|> with no space, so replies start with a "▁word" piece.
CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {%- set system = messages[0]['content'] -%}\n"
    "    {%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set system = '' -%}\n"
    "    {%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{{- '<|bom|><|system|> ' + system -}}\n"
    "{%- for message in turns -%}\n"
    "    {{- '<|eom|><|bom|><|' + message['role'] + '|> ' + message['content'] -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|eom|><|bom|><|assistant|>' -}}\n"
    "{%- else -%}\n"
    "    {{- '<|eom|>' -}}\n"
    "{%- endif -%}\n"
)

_SPEAKER = re.compile(r"^[A-Z][A-Za-z .,'&-]*:$")


@dataclass
class Speech:
    speaker: str
    lines: list[str]


def default_corpus() -> Path:
    places = [p / "tinyshakespeare.txt" for p in CORPUS_PLACES]
    return next((p for p in places if p.is_file()), places[-1])


def split_corpus(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, validation): validation is the last `val_fraction` of the text, starting at a speech."""
    cut = text.find("\n\n", int(len(text) * (1 - val_fraction)))
    if cut < 0:
        raise ValueError("the corpus has no blank line in its last part to start the validation split at")
    return text[:cut + 1], text[cut + 2:]


def excerpt(val_text: str, max_bytes: int = EXCERPT_BYTES) -> str:
    """The longest run of whole speeches at the start of the validation text within `max_bytes`."""
    end = 0
    for m in re.finditer(r"\n\n", val_text):
        if len(val_text[:m.start() + 1].encode()) > max_bytes:
            break
        end = m.start() + 1
    return val_text[:end]


def speeches(text: str) -> list[Speech]:
    """The play's speeches in order: a "NAME:" line followed by the lines spoken."""
    out = []
    for block in re.split(r"\n{2,}", text):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and _SPEAKER.match(lines[0]):
            out.append(Speech(lines[0][:-1], [line.strip() for line in lines[1:] if line.strip()]))
    return out


def dialogues(items: list[Speech], rng: random.Random, max_turns: int = 6) -> list[list[dict]]:
    """Conversations from consecutive speeches: the user says one speech, the assistant the reply after it.

    One conversation starts at every speech; it has an even number of turns (2..max_turns) and ends on
    the assistant. User turns are typed as one line, replies keep the verse's line breaks.
    """
    out = []
    for i in range(len(items) - 1):
        n = min(rng.randrange(2, max_turns + 1, 2), (len(items) - i) // 2 * 2)
        turns = []
        for j, s in enumerate(items[i:i + n]):
            role = "user" if j % 2 == 0 else "assistant"
            turns.append({"role": role, "content": (" " if role == "user" else "\n").join(s.lines)})
        out.append(turns)
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render through CHAT_TEMPLATE with the Jinja settings transformers uses for chat templates."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token=BOS,
                                                 add_generation_prompt=add_generation_prompt)


def train_tokenizer(train_text: str, vocab_size: int):
    """A `tokenizers.Tokenizer`: Metaspace pieces, BPE with byte fallback, Jamba's specials at ids 0-7.

    Every word piece starts with "▁", at the start of the text and of each line too (as SentencePiece gives
    for one sentence a line), so "ROMEO:" typed as a prompt, a speaker's line in the play and a chat turn
    after "<|user|> " all tokenize alike. Newlines are pieces of their own; decoding removes the "▁" put
    after each newline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    def pipeline(tok):
        tok.normalizer = normalizers.Replace(Regex("\n(?=[^\n])"), "\n ")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0), decoders.Replace("\n ", "\n")])
        return tok

    base = pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=SPECIALS,
                                  min_frequency=2, max_token_length=16, show_progress=False)
    base.train_from_iterator(re.split(r"(?<=\n)\n", train_text), trainer)

    # Rebuild the model with the 256 byte tokens right after the specials, as Llama-style vocabularies have.
    model = json.loads(base.to_str())["model"]
    pieces = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = pipeline(Tokenizer(models.BPE(vocab, merges, byte_fallback=True)))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])])
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "excerpt":
        print("usage: tiny_corpus.py excerpt CORPUS OUT", file=sys.stderr)
        return 2
    _, val = split_corpus(Path(argv[1]).read_text())
    Path(argv[2]).write_text(excerpt(val))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
