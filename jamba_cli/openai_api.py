"""The OpenAI API's request and response shapes, mapped to ours: a request body becomes a `Job` spec (prompt ids,
message boundaries, `SamplingParams`), and generation chunks become chat.completion / text_completion objects.

Nothing here knows HTTP or threads (server.py does); nothing here imports torch. Every refusal is an `ApiError`,
which carries the status and the OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
import numbers
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import __version__, reasoning
from .errors import ChatTemplateError, ContextOverflowError, SamplingError, UsageError
from .features import Features, Reply, check_request_documents, check_request_tools
from .sample import MIN_TEMPERATURE, SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",  # developer: o1's name
         "tool": "tool"}
FINISH_REASONS = {"stop": "stop", "stop_string": "stop", "length": "length", "tool_calls": "tool_calls"}
SYSTEM_FINGERPRINT = f"jamba-cli-{__version__}"


class ApiError(Exception):
    """A request the server refuses or fails: `status` and the OpenAI error body (`body()`)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Spec:
    """What a request asks the engine for, and how the answer is to be shaped."""

    kind: str  # "chat" or "completion"
    ids: list[int]
    params: SamplingParams
    boundaries: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    features: Features | None = None  # chat: tools, documents, citations, thinking (features.py)
    thinking: bool = False  # the prompt left <think> open: the reply starts with reasoning


# -- the fields, checked as OpenAI checks them (the type, then the range) --

def _get(body: dict, name: str, kind, default=None):
    """body[name] when it is of `kind` (int, float, bool, str, list, dict), None and absent giving `default`."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array",
                dict: "an object"}[kind]
        raise bad(f"`{name}` must be {what}, not {_json_type(value)}", name)
    return value


def _json_type(value) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(
        type(value), "an integer" if isinstance(value, int) else "a number")


def _unsupported(body: dict, name: str, default, why: str) -> None:
    """Refuse a field that asks for something we do not do (anything but its default)."""
    value = body.get(name)
    if value is not None and value != default:
        raise bad(f"`{name}` is not supported: {why}", name)


def sampling(body: dict, *, kind: str, defaults: SamplingParams, context_size: int) -> SamplingParams:
    """The request's sampling fields as `SamplingParams` over the server's defaults (the sampling flags of
    `jamba serve`; fields neither sets take generation_config.json when generating)."""
    n = _get(body, "n", int, 1)
    if n != 1:
        raise bad("`n` must be 1: one completion per request (send several requests instead)", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        _unsupported(body, name, 0, "use `repetition_penalty` (1 is off; > 1 penalises tokens already seen)")
    if kind == "chat":
        _unsupported(body, "logprobs", False, "log probabilities are not computed")
        _unsupported(body, "top_logprobs", 0, "log probabilities are not computed")
        response_format = _get(body, "response_format", dict, {})
        if response_format.get("type", "text") != "text":
            raise bad("`response_format` is not supported: only {\"type\": \"text\"}", "response_format")
    else:
        _unsupported(body, "logprobs", None, "log probabilities are not computed")
        _unsupported(body, "echo", False, "the prompt is not returned")
        _unsupported(body, "suffix", "", "there is no insertion")
        _unsupported(body, "best_of", 1, "one completion per request")
    if _get(body, "logit_bias", dict, {}):
        raise bad("`logit_bias` is not supported", "logit_bias")

    max_tokens = _get(body, "max_tokens", int)
    if kind == "chat":
        max_tokens = _get(body, "max_completion_tokens", int, max_tokens)
    if max_tokens is not None and not 1 <= max_tokens <= context_size:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise bad(f"`{param}` is {max_tokens}; it must be from 1 to {context_size}, the tokens the context holds",
                  param)
    temperature = _get(body, "temperature", float)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        temperature = 0.0  # colder than our floor is greedy in all but overflow (sample.py); clients send 1e-3
    top_k = _get(body, "top_k", int)
    top_k = 0 if top_k == -1 else top_k  # vLLM's "off"
    seed = _get(body, "seed", int)
    seed = None if seed is None else seed % 2**64  # OpenAI takes any int64; ours is unsigned
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("`stop` must be a string or an array of strings", "stop")
    values = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=_get(body, "top_p", float),
                  min_p=_get(body, "min_p", float), repetition_penalty=_get(body, "repetition_penalty", float),
                  seed=seed, ignore_eos=_get(body, "ignore_eos", bool))
    try:
        params = defaults.override(**values)
        return params if not stop else params.override(stop=tuple(stop))
    except SamplingError as e:
        raise bad(f"`{e.param}` is {e.value}, out of range ({e.rule.format(e.param)})", e.param) from None


def options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _get(body, "stream", bool, False)
    stream_options = _get(body, "stream_options", dict, {})
    include = stream_options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("`stream_options.include_usage` must be a boolean", "stream_options")
    return stream, include


# -- prompts --

def messages(body: dict, system: str | None) -> list[dict]:
    """The chat messages as the chat template takes them: roles system/user/assistant ("developer" is
    system), content a string (text parts joined by newlines). `system` is put first when the request has
    no system message of its own."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("`messages` must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"`{where}` must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"`{where}.role` must be one of system, developer, user, assistant, tool, not {role!r}", where)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"`{where}.content`: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                              "supported", where)
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None and (m.get("tool_calls") or m.get("reasoning_content")):
            content = ""  # an assistant turn that only called tools
        if not isinstance(content, str):
            raise bad(f"`{where}.content` must be a string or an array of text parts", where)
        message = {"role": ROLES[role], "content": content}
        for key, kind in (("tool_calls", list), ("reasoning_content", str), ("tool_call_id", str), ("name", str)):
            if m.get(key) is not None:  # as the template expects them of earlier turns
                if not isinstance(m[key], kind):
                    raise bad(f"`{where}.{key}` must be {'an array' if kind is list else 'a string'}", where)
                message[key] = m[key]
        out.append(message)
    if system is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    return out


def features(body: dict, tokenizer) -> Features:
    """The request's tools (`tool_choice` "auto" or "none"), and the extension fields `documents`,
    `citations`, `think`, `reasoning_budget`, checked against the model's chat template."""
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise bad("`tool_choice` may be \"auto\" or \"none\"; forcing a tool call is not supported", "tool_choice")
    try:
        f = Features(tools=None if choice == "none" else check_request_tools(body.get("tools")),
                     documents=check_request_documents(body.get("documents")),
                     citations=_get(body, "citations", bool, False), think=_get(body, "think", bool),
                     reasoning_budget=_get(body, "reasoning_budget", int))
        f.check(tokenizer)
    except UsageError as e:
        raise bad(str(e), re.search(r"`(\w+)", str(e)).group(1) if "`" in str(e) else None) from None
    return f


def chat_prompt(tokenizer, msgs: list[dict], context_size: int,
                f: Features | None = None) -> tuple[list[int], list[int], bool]:
    """(ids, boundaries, thinking): the messages through the checkpoint's chat template with a generation
    prompt, as `jamba run` renders them (text inside the messages tokenized as plain text, so it cannot
    forge the template's markup); the token offsets where each message ends (where rendering the messages up
    to it gives a prefix of the text that ends on a token boundary; the engine keeps its state there); and
    whether the prompt leaves a `<think>` open."""
    kw = f.template_kwargs(tokenizer) if f is not None else {}
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, **kw)
        ids = tokenizer.encode_chat(msgs, add_generation_prompt=True, limit=context_size, **kw)
    except ChatTemplateError as e:
        if not tokenizer.has_chat_format:
            raise bad("this model has no chat template: send the prompt as text to /v1/completions",
                      "messages") from None
        raise bad(str(e), "messages") from None
    except ContextOverflowError as e:
        raise bad(f"{e}", "messages", "context_length_exceeded") from None
    thinking = reasoning.template_thinks(tokenizer.chat_template) and reasoning.prompt_opens_thinking(text)
    return ids, _boundaries(tokenizer, msgs, text, ids, kw), thinking


def _boundaries(tokenizer, msgs: list[dict], text: str, ids: list[int], kw: dict) -> list[int]:
    ends = []
    for k in range(1, len(msgs) + 1):
        try:
            prefix = tokenizer.apply_chat_template(msgs[:k], **kw)
        except ChatTemplateError:  # a template may insist on a user message last: no boundary there
            continue
        if text.startswith(prefix):
            ends.append(len(prefix))
    # one more tokenization (not one per message) maps each character offset to its token offset; the
    # tokenizer's offsets are not in its public interface, so without them no boundary is given
    tok = getattr(tokenizer, "_tok", None)
    encoding = tok.encode(text, add_special_tokens=False) if ends and tok is not None else None
    if encoding is None or encoding.ids != ids:
        return []
    offsets = encoding.offsets
    last_ending = {end: i + 1 for i, (_, end) in enumerate(offsets)}  # char offset -> tokens up to it
    out = set()
    for e in ends:
        n = last_ending.get(e)
        if n is not None and (n == len(ids) or offsets[n][0] >= e):  # no token straddles the end
            out.add(n)
    return sorted(out)


def completion_prompt(tokenizer, body: dict, context_size: int) -> list[int]:
    """The ids of a completions prompt: a string (tokenized as `jamba run --raw` does, BOS included where the
    tokenizer adds one), an array of one string, or token ids (used as they are)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt, limit=context_size)
        except ContextOverflowError as e:
            raise bad(str(e), "prompt", "context_length_exceeded") from None
        if not ids:  # a tokenizer that adds no BOS: there is nothing to continue from
            raise bad("`prompt` is empty", "prompt")
        return ids
    if prompt == []:
        raise bad("`prompt` is empty", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        vocab = tokenizer.vocab_size
        wrong = next((i for i in prompt if not 0 <= i < vocab), None)
        if wrong is not None:
            raise bad(f"`prompt` holds the token id {wrong}; ids are from 0 to {vocab - 1}", "prompt")
        if len(prompt) > context_size:
            raise bad(f"the prompt needs {len(prompt)} tokens but the context holds {context_size}", "prompt",
                      "context_length_exceeded")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad("`prompt` must be one prompt: send one request per prompt", "prompt")
    raise bad("`prompt` must be a string, an array of one string, or an array of token ids", "prompt")


def check_model(body: dict, served: Sequence[str]) -> None:
    model = body.get("model")
    if model is not None and model not in served:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served[0]}`",
                       param="model", code="model_not_found")


# -- responses --

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generation_tokens,
            "total_tokens": stats.prompt_tokens + stats.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def finish_reason(reason: str | None) -> str | None:
    return FINISH_REASONS.get(reason, reason)


class Shaper:
    """The objects of one response, non-streamed (`whole`) or streamed (`chunk`, `usage_chunk`)."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id, self.created = new_id(kind), int(time.time())

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    def whole(self, text: str, reason: str | None, stats, reply: Reply | None = None) -> dict:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reason)}
            if reply is not None:
                message["content"] = reply.content if reply.content or not reply.tool_calls else None
                if reply.reasoning is not None:
                    message["reasoning_content"] = reply.reasoning
                if reply.tool_calls:
                    message["tool_calls"] = [c.openai() for c in reply.tool_calls]
                    choice["finish_reason"] = "tool_calls"
                if reply.citations is not None:
                    choice["citations"] = reply.citations  # an extension: the documents the answer cites
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(stats)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(stats)}

    def chunk(self, text: str | None, reason: str | None = None, *, first: bool = False,
              include_usage: bool = False, kind: str = "content", extra: dict | None = None) -> dict:
        """A stream chunk: `text` of `kind` "content" or "reasoning" (sent as `reasoning_content`, as vLLM
        and DeepSeek do); `extra` goes into the delta (`tool_calls`) or, for `citations`, the choice."""
        if self.kind == "chat":
            field_name = "reasoning_content" if kind == "reasoning" else "content"
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {field_name: text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}
            for key, value in (extra or {}).items():
                (choice if key == "citations" else delta)[key] = value
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason(reason)}
            out = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            out["usage"] = None  # as OpenAI sends it: null on every chunk but the last
        return out

    def usage_chunk(self, stats) -> dict:
        object = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(object), "choices": [], "usage": usage(stats)}
