"""The checkpoint's tokenizer: tokenizer.json through `tokenizers`, special tokens from tokenizer_config.json,
chat templates rendered as transformers renders them, and a streaming detokenizer."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

from .checkpoint_files import check_file, read_json, read_text, shown
from .checkpoint_files import value as shown_value
from .errors import ChatTemplateError, CheckpointError, ContextOverflowError

# transformers' named special tokens: the ones a chat template sees as variables
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Jamba 1.5+ turn markup; a tokenizer that has these tokens gets the built-in format when it ships no template
JAMBA_CHAT_TOKENS = ("<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>")
END_OF_TURN = "<|eom|>"
# A text longer than this (in characters) that must fit a limit is first counted in pieces of about this
# size, so that one too long for the context is refused having tokenized only about the context's worth:
# tokenizing takes many times the memory of the text it is given.
PIECE_CHARS = 1 << 16
# How many tokens the count of a text tokenized in pieces may exceed its count tokenized whole, per cut:
# tokens that would merge across a cut, a prefix space added to a piece, a special token cut in two.
# Generous: far above what Jamba's tokenizer showed with cuts in the middle of words.
SLACK_PER_CUT = 32


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode with the special-token conventions transformers applies to the same files.

    `eos_token_ids` joins the tokenizer's EOS with generation_config.json's `eos_token_id` (an int or a
    list), and `end_of_turn_ids` holds the chat format's end-of-message token when the vocabulary has one.
    `generation_config` is the checkpoint's generation_config.json (sampling defaults), or {}.
    """

    def __init__(self, tok, config: dict, generation_config: dict | None = None):
        self._tok = tok
        self.config = config
        self.generation_config = generation_config or {}
        self.special_tokens = {name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES
                               if _token_text(config.get(name)) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        # tokenizer_config's add_bos/eos flags override the saved post-processor, as transformers does
        self._manual_specials = "add_bos_token" in config or "add_eos_token" in config
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        gen_eos = self.generation_config.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        self.eos_token_ids = list(dict.fromkeys([i for i in [self.eos_token_id, *gen_eos] if isinstance(i, int)]))
        eom = self.token_to_id(END_OF_TURN)
        self.end_of_turn_ids = [] if eom is None else [eom]
        self.chat_template = _pick_template(config.get("chat_template"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True, *, limit: int | None = None) -> list[int]:
        """Token ids of `text`.

        Args:
            limit: the most tokens that can be taken (the context's size): more raise ContextOverflowError.
                A long text is counted in pieces first, stopping once the count passes `limit`, so a text
                far too long costs time and memory for about `limit` tokens, not for the whole of it.
        """
        if limit is not None and len(text) > PIECE_CHARS:
            over = self._count_beyond(text, limit)
            if over is not None:
                raise ContextOverflowError(f"the prompt needs more than {over} tokens but the context holds {limit}")
        if not self._manual_specials:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
            if add_special_tokens:
                if self.add_bos_token and self.bos_token_id is not None:
                    ids = [self.bos_token_id] + ids
                if self.add_eos_token and self.eos_token_id is not None:
                    ids = ids + [self.eos_token_id]
        if limit is not None and len(ids) > limit:
            raise ContextOverflowError(f"the prompt needs {len(ids)} tokens but the context holds {limit}")
        return ids

    def _count_beyond(self, text: str, limit: int) -> int | None:
        """A count of tokens that `text` surely exceeds, when that count is more than `limit`; else None.

        The text is tokenized a piece at a time, each cut before a space or line break where there is one
        near, and counting stops once the pieces' count, less `SLACK_PER_CUT` for each cut and for the end
        (a longer text can merge into the last piece's tokens), is past `limit`."""
        count = cuts = start = 0
        while start < len(text):
            end = start + PIECE_CHARS
            if end < len(text):
                cut = max(text.rfind(" ", end - PIECE_CHARS // 2, end), text.rfind("\n", end - PIECE_CHARS // 2, end))
                end = cut if cut > start else end
            count += len(self._tok.encode(text[start:end], add_special_tokens=False))
            start, cuts = end, cuts + 1
            if count - SLACK_PER_CUT * cuts > limit:
                return count - SLACK_PER_CUT * cuts
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the <0xNN> byte tokens of a byte-fallback model (SentencePiece style), else empty."""
        model = json.loads(self._tok.to_str()).get("model", {})
        if not model.get("byte_fallback"):
            return frozenset()
        return frozenset(i for t, i in self._tok.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t))

    # -- chat format --

    @property
    def has_builtin_chat_format(self) -> bool:
        return all(self.token_to_id(t) is not None for t in JAMBA_CHAT_TOKENS)

    @property
    def has_chat_format(self) -> bool:
        """True when prompts can be wrapped as a chat: a template ships, or the Jamba 1.5+ tokens exist."""
        return self.chat_template is not None or self.has_builtin_chat_format

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            template: str | None = None, **kwargs) -> str:
        """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` does.

        Args:
            messages: [{"role": ..., "content": ...}, ...]; keys whose value is None are dropped.
            template: a Jinja template to use instead of the checkpoint's.
            **kwargs: more template variables (they override the special tokens of the same name).

        Raises:
            ChatTemplateError: the template raised or failed, or there is no chat format at all.
        """
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        source = template or self.chat_template
        if isinstance(source, dict):
            source = source.get("tool_use") if tools is not None and "tool_use" in source else source.get("default")
        if source is None:
            if not self.has_builtin_chat_format:
                raise ChatTemplateError("this checkpoint has no chat template; give the prompt as text, not messages")
            if tools or documents or kwargs:
                raise ChatTemplateError("tools and documents need the checkpoint's own chat template")
            return _jamba_format(messages, add_generation_prompt, self.bos_token)
        import jinja2

        try:
            return _render_bounded(_compile(source), messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict], *, limit: int | None = None, **kwargs) -> list[int]:
        """Token ids of the rendered chat. The template writes BOS itself, so none is added (no double BOS).
        `limit` is `encode`'s: a chat of more tokens raises ContextOverflowError.

        The text of a message, a document, a tool definition or a tool call (every string value but a
        message's role) is tokenized as plain text: an added token's text in it (`<|im_end|>`, `<|eom|>`,
        `<think>`) is spelled out, never the token, so pasted text cannot end a turn or open another. Only the
        template's own markup makes those tokens. This differs, on purpose, from transformers (and vLLM and
        llama.cpp), which tokenize the rendered text whole; where no such text is in the content, the ids are
        the same as theirs.
        """
        text, spans = self.render_protected(messages, **kwargs)
        if not spans:
            return self.encode(text, add_special_tokens=False, limit=limit)
        if limit is not None and len(text) > PIECE_CHARS:
            over = self._count_beyond(text, limit)
            if over is not None:
                raise ContextOverflowError(f"the prompt needs more than {over} tokens but the context holds {limit}")
        ids = self._encode_protected(text, spans)
        if limit is not None and len(ids) > limit:
            raise ContextOverflowError(f"the prompt needs {len(ids)} tokens but the context holds {limit}")
        return ids

    # -- special tokens: which are control tokens, and content that spells them --

    @cached_property
    def added_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens the tokenizer matches in text before the model's own pieces."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """Ids of the control tokens (special added tokens spelled `<|...|>`: turn markup, padding, end of
        text): left out of shown output unless asked for (`--special`). Markup a reply is parsed by
        (`<think>`, `<tool_call>`) is not among them."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items()
                         if t.special and re.fullmatch(r"<\|[^|]*\|>", t.content))

    def render_protected(self, messages: list[dict], **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat (as `apply_chat_template`), and the spans (start, end) of added-token text
        that came from the content rather than from the template's markup.

        Content holding such text is rendered with a marker character inside each occurrence (one found in
        no input), which is then taken out: the template sees it, so its checks (`'<think>' in content`)
        are not fooled by content either."""
        added = sorted(self.added_tokens, key=len, reverse=True)
        values = [messages, kwargs.get("tools"), kwargs.get("documents")]
        if not added or not any(t in s for s in _strings(values) for t in added):
            return self.apply_chat_template(messages, **kwargs), []
        source = repr(self.chat_template)
        mark = next(c for c in map(chr, range(0xFDD0, 0xFDF0))
                    if c not in source and not any(c in s for s in _strings(values)))

        def escape(value):
            if isinstance(value, str):
                for t in added:
                    value = value.replace(t, t[0] + mark + t[1:])
                return value
            if isinstance(value, list):
                return [escape(v) for v in value]
            if isinstance(value, dict):
                return {k: v if k == "role" else escape(v) for k, v in value.items()}
            return value

        for key in ("tools", "documents"):
            if kwargs.get(key) is not None:
                kwargs[key] = escape(kwargs[key])
        marked = self.apply_chat_template(escape(messages), **kwargs)
        pieces, spans, start, removed = [], [], 0, 0
        for at in (i for i, c in enumerate(marked) if c == mark):
            pieces.append(marked[start:at])
            start, removed = at + 1, removed + 1
            spans.append(at - removed)  # where the token's text starts in the clean text
        pieces.append(marked[start:])
        text = "".join(pieces)
        out = []
        for p in spans:
            length = next((len(t) for t in added if text.startswith(t, p)), 0)
            if length:
                out.append((p, p + length))
        return text, out

    @cached_property
    def _plain(self):
        """This tokenizer without its added tokens: text comes out as the model's own pieces."""
        from tokenizers import Tokenizer as HFTokenizer

        data = json.loads(self._tok.to_str())
        data["added_tokens"] = []
        return HFTokenizer.from_str(json.dumps(data))

    def _encode_protected(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Ids of `text` as the tokenizer makes them, except that the added-token text in `spans` is spelled
        out in plain pieces. The tokenizer splits text at added tokens and encodes what lies between them
        alone, so the stretches between the markup's own added tokens are encoded alone here too: those
        with a span by the tokenizer without added tokens, the others as they were."""
        enc = self._tok.encode(text, add_special_tokens=False)
        added, starts = set(self.added_tokens.values()), {s for s, _ in spans}
        out, gap, gap_start = [], [], 0

        def flush(end: int):
            if any(gap_start <= s < end for s in starts):
                out.extend(self._plain.encode(text[gap_start:end], add_special_tokens=False).ids)
            else:
                out.extend(gap)

        for token, (s, e) in zip(enc.ids, enc.offsets):
            if token in added and s not in starts:  # the template's markup
                flush(s)
                out.append(token)
                gap, gap_start = [], e
            else:
                gap.append(token)
        flush(len(text))
        return out


def _strings(value):
    """Every string in nested lists and dicts (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


def _pick_template(value) -> str | dict | None:
    # older tokenizer_config files hold a list of named templates
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t}
    return value or None


def _jamba_format(messages: list[dict], add_generation_prompt: bool, bos_token: str | None) -> str:
    # The plain-message subset of the Jamba 1.5-1.7 template: a (possibly empty) system turn always comes first.
    system = ""
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0].get("content") or "", messages[1:]
    parts = [bos_token or "", "<|bom|><|system|> ", system]
    for m in messages:
        content = m.get("content") or ""
        parts.append(f"<|eom|><|bom|><|{m['role']}|> {content if isinstance(content, str) else json.dumps(content)}")
    parts.append("<|eom|><|bom|><|assistant|>" if add_generation_prompt else "<|eom|>")
    return "".join(parts)


# A checkpoint's chat template is untrusted code, run in Jinja's sandbox (no attribute of the interpreter's
# internals, no I/O, ranges of at most 100,000 items). The sandbox bounds neither time nor output, so a render
# is stopped past these: far beyond what rendering a 256K-token conversation takes.
TEMPLATE_SECONDS = 10.0
TEMPLATE_MAX_CHARS = 64 << 20


class _TemplateBudget(Exception):
    pass


def _render_bounded(template, **context) -> str:
    """template.render(**context), stopped with a ChatTemplateError past TEMPLATE_SECONDS or
    TEMPLATE_MAX_CHARS. Time is checked at every piece of output and every call the template makes, and on
    the main thread also by an interval timer, which reaches loops that neither print nor call."""
    import signal
    import threading
    import time

    deadline = time.monotonic() + TEMPLATE_SECONDS
    env = template.environment
    stopped = []  # one stop only: the timer must not raise again while the first stop unwinds

    def stop(reason: str):
        if not stopped:
            stopped.append(reason)
            raise _TemplateBudget(reason)

    def check():
        if time.monotonic() > deadline:
            stop(f"rendering took more than {TEMPLATE_SECONDS:g} s")

    timer = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = None
    if timer:
        def on_alarm(signum, frame):
            stop(f"rendering took more than {TEMPLATE_SECONDS:g} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    env.budget_check = check
    pieces, size = [], 0
    try:
        for piece in template.generate(**context):
            pieces.append(piece)
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                stop(f"the rendered prompt passed {TEMPLATE_MAX_CHARS >> 20} M characters")
            check()
        stopped.append("done")  # a late timer is harmless from here on
    except _TemplateBudget as e:
        raise ChatTemplateError(f"chat template stopped: {e}") from None
    finally:
        env.budget_check = None
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return "".join(pieces)


@lru_cache(maxsize=8)
def _compile(source: str):
    """Compile a chat template in the environment transformers uses: sandboxed, immutable, trim/lstrip blocks."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}` marks assistant text for training masks; rendering keeps the body as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # like transformers: no underscore names, so a template cannot reach interpreter internals
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # unlike jinja's own filter: no HTML escaping, and indent/separators are honoured
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Environment(ImmutableSandboxedEnvironment):
        budget_check = None  # set by _render_bounded for the length of a render

        def call(__self, __context, __obj, *args, **kwargs):  # every call a template makes
            if __self.budget_check is not None:
                __self.budget_check()
            return super().call(__context, __obj, *args, **kwargs)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None


class StreamingDetokenizer:
    """Turn token ids, one at a time, into text segments whose concatenation equals `decode(all ids)`.

    Each new token is decoded together with the tokens before it (from the start of the last emitted
    piece), so decoders that depend on context (leading-space stripping, byte fallback, byte-level BPE)
    give the same text as a full decode. A segment that would end in U+FFFD (an unfinished UTF-8
    character) is held back until a later token completes it, or until `flush`; so is a run of byte-fallback
    tokens, because one invalid byte turns the whole run into U+FFFD when it is decoded.
    """

    def __init__(self, tokenizer: Tokenizer, skip=()):
        self._tokenizer = tokenizer
        self._skip = frozenset(skip)  # ids whose text is left out (control tokens, unless shown)
        self.tokens: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this index have been emitted
        self._bytes = tokenizer.byte_fallback_ids

    def add(self, token: int) -> str:
        """Add one token; return the text it completes (often "", never half a character)."""
        if int(token) in self._skip:
            return ""
        self.tokens.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character comes out as U+FFFD, as in decode)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.tokens) or (not final and self.tokens[-1] in self._bytes):
            return ""
        decode = self._tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read])
        text = decode(self.tokens[self._prefix:])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(before):]


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of the checkpoint in `directory`. Its files come from the checkpoint, so they are read as
    untrusted (checkpoint_files): regular files inside the folder, each value checked for its type, a chat
    template compiled here; every refusal names the file and the key."""
    from tokenizers import Tokenizer as HFTokenizer

    path = directory / "tokenizer.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"no tokenizer.json in {directory}")
    check_file(path, directory)
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"tokenizer.json in {directory} is too large ({path.stat().st_size:,} bytes)")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"tokenizer.json in {directory} cannot be read: {shown(first)}") from None
    config = _read_json(directory, "special_tokens_map.json")
    _check_tokenizer_config(config, "special_tokens_map.json")
    own = _read_json(directory, "tokenizer_config.json")
    _check_tokenizer_config(own, "tokenizer_config.json")
    config.update(own)
    template = directory / "chat_template.jinja"
    source = "tokenizer_config.json: key 'chat_template'"
    if os.path.lexists(template):  # the separate file wins over tokenizer_config's entry, as in transformers
        config["chat_template"] = read_text(check_file(template, directory))
        source = "chat_template.jinja"
    generation = _read_json(directory, "generation_config.json")
    _check_generation_config(generation)
    tokenizer = Tokenizer(tok, config, generation)
    for name, text in _templates(tokenizer.chat_template):
        what = source if name is None else f"{source} (template {shown_value(name)})"
        try:  # a syntax error shows now, naming the file, rather than at the first chat message
            _compile(text)
        except ChatTemplateError as e:
            raise CheckpointError(f"{what}: {e}") from None
        except (RecursionError, SyntaxError, MemoryError):  # Python's compiler refuses what jinja made of it
            raise CheckpointError(f"{what}: the chat template is nested too deeply to compile") from None
    return tokenizer


MAX_TOKENIZER_BYTES = 512 << 20  # the largest vocabularies take tens of MB


def _read_json(directory: Path, name: str) -> dict:
    path = directory / name
    if not os.path.lexists(path):
        return {}
    return read_json(check_file(path, directory))


def _check_tokenizer_config(config: dict, source: str) -> None:
    """The keys of tokenizer_config.json (and special_tokens_map.json) that are used, each of its JSON type."""
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, dict) and isinstance(value.get("content"), (str, type(None))))):
            raise CheckpointError(f"{source}: key {name!r} must be a token (a string, or an object with a string "
                                  f"'content'), got {shown_value(value)}")
    for name in ("add_bos_token", "add_eos_token"):
        if name in config and not isinstance(config[name], bool):
            raise CheckpointError(f"{source}: key {name!r} must be true or false, "
                                  f"got {shown_value(config[name])}")
    template = config.get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise CheckpointError(f"{source}: key 'chat_template' must be a template or a list of "
                                  f"{{\"name\": ..., \"template\": ...}} objects")
    elif template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: key 'chat_template' must be a string, got {shown_value(template)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _is_ids(v) -> bool:
    return (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v))


# generation_config.json's keys that are read: the JSON type each must have (their ranges are sample.py's)
_GENERATION_KEYS = {
    **dict.fromkeys(("temperature", "top_p", "min_p", "repetition_penalty"), (_is_number, "a finite number")),
    **dict.fromkeys(("top_k", "max_new_tokens"), (_is_int, "an integer")),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "eos_token_id": (_is_ids, "a token id or a list of them"),
}


def _check_generation_config(config: dict) -> None:
    for key, (ok, want) in _GENERATION_KEYS.items():
        if config.get(key) is not None and not ok(config[key]):
            raise CheckpointError(f"generation_config.json: key {key!r} must be {want}, "
                                  f"got {shown_value(config[key])}")


def _templates(template) -> list[tuple[str | None, str]]:
    if isinstance(template, dict):
        return [(name, text) for name, text in template.items() if isinstance(text, str)]
    return [(None, template)] if isinstance(template, str) else []
