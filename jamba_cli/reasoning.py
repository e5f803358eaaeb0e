"""Reasoning models: the `<think>…</think>` part of a reply as a stream of its own, and a budget for it.

Jamba-Reasoning-3B's template ends its generation prompt inside `<think>\\n`, so a reply starts as reasoning
and turns into the answer at `</think>`; other models open `<think>` themselves. `ThinkSplitter` cuts a
streamed reply into ("reasoning", text) and ("content", text) pieces, tags included in neither, across chunk
boundaries. `ReasoningBudget` is a logits processor that, after N thinking tokens, makes the model write the
closing tag (`--reasoning-budget N`; 0 is `--no-think` for a template that always thinks). No terminal code:
run, chat and serve each show the pieces their own way.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
CLOSE_TEXT = "\n</think>\n\n"  # what the Reasoning-3B template writes between thinking and the answer


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves a `<think>` open: the reply then starts as reasoning."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def template_thinks(source) -> bool:
    """Whether a chat template knows thinking at all (a `<think>` tag or an `enable_thinking` switch)."""
    sources = source.values() if isinstance(source, dict) else [source]
    return any(isinstance(s, str) and (OPEN in s or "enable_thinking" in s) for s in sources)


def thinking_variables(source, think: bool | None) -> dict:
    """Template variables for `--think/--no-think`: `enable_thinking` where the template reads that switch
    (Qwen3-style templates); nothing where it does not (Jamba-Reasoning-3B always thinks: `--no-think` is
    then a budget of 0, see `ReasoningBudget`)."""
    sources = source.values() if isinstance(source, dict) else [source]
    if think is None or not any(isinstance(s, str) and "enable_thinking" in s for s in sources):
        return {}
    return {"enable_thinking": think}


class ThinkSplitter:
    """Cut streamed reply text into reasoning and answer.

    Args:
        thinking: the reply starts inside `<think>` (the prompt opened it). Otherwise a `<think>` at the
            start of the reply (after white space) opens it; one later is answer text.
    """

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.entered = thinking  # the reply thought (even if nothing)
        self.started = thinking  # past the point where a <think> may still open
        self.pending = ""
        self.trim = thinking  # line breaks right after a tag are the template's, not the text's
        self.reasoning: list[str] = []
        self.content: list[str] = []

    def feed(self, text: str) -> list[tuple[str, str]]:
        """The pieces `text` completes, as (kind, text) with kind "reasoning" or "content"; text that may be
        the start of a tag is held back until the next call or `flush`."""
        buf, out = self.pending + text, []
        self.pending = ""
        while buf:
            if self.trim:
                buf = buf.lstrip("\n")
                self.trim = not buf
                continue
            if not self.started:
                stripped = buf.lstrip()
                if stripped.startswith(OPEN):
                    buf, self.thinking, self.started = stripped[len(OPEN):], True, True
                    self.entered = self.trim = True
                    continue
                if OPEN.startswith(stripped):  # white space, or part of the tag: wait for more
                    self.pending = buf
                    break
                self.started = True
                continue
            if not self.thinking:
                out.append(("content", buf))
                break
            at = buf.find(CLOSE)
            if at >= 0:
                out.append(("reasoning", buf[:at]))
                buf, self.thinking, self.trim = buf[at + len(CLOSE):], False, True
                continue
            keep = next((k for k in range(min(len(CLOSE) - 1, len(buf)), 0, -1) if buf.endswith(CLOSE[:k])), 0)
            out.append(("reasoning", buf[:len(buf) - keep]))
            self.pending = buf[len(buf) - keep:]
            break
        out = [(kind, t) for kind, t in out if t]
        for kind, t in out:
            (self.reasoning if kind == "reasoning" else self.content).append(t)
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is held back, as the kind it is in now."""
        text, self.pending = self.pending, ""
        if not text:
            return []
        kind = "reasoning" if self.thinking else "content"
        (self.reasoning if kind == "reasoning" else self.content).append(text)
        return [(kind, text)]


class ReasoningBudget:
    """A logits processor that ends thinking after `budget` tokens by forcing `CLOSE_TEXT`'s tokens.

    It counts from the first token of the reply when the prompt opened thinking (`thinking`), else from a
    `<think>` the model writes. A reply that closes thinking itself is left alone. Works on the logits of
    any decoder (the CUDA graph's too): the forced token is the only one left with a finite logit.
    """

    def __init__(self, tokenizer, budget: int, thinking: bool):
        self.budget = budget
        self.open_ids = tokenizer.encode(OPEN, add_special_tokens=False)
        self.close_ids = tokenizer.encode(CLOSE, add_special_tokens=False)
        self.force_ids = tokenizer.encode(CLOSE_TEXT, add_special_tokens=False)
        self.thinking = thinking
        self.start: int | None = None  # history length at the first call: the reply starts there
        self.opened_at: int | None = None
        self.done = False
        self.forcing: list[int] = []

    def __call__(self, history, logits):
        length = history.shape[1]
        if self.start is None:
            self.start = length
            if self.thinking:
                self.opened_at = length
        if self.done and not self.forcing:
            return logits
        if not self.forcing:
            # only the newest tokens are looked at: a tag is found the step its last token arrives
            since = self.start if self.opened_at is None else self.opened_at
            tail = history[0, max(since, length - TAIL):].tolist()
            if self.opened_at is None:
                if _ends_with(tail, self.open_ids):
                    self.opened_at = length
                return logits
            if _ends_with(tail, self.close_ids):
                self.done = True
                return logits
            if length - self.opened_at < self.budget:
                return logits
            self.forcing, self.done = list(self.force_ids), True
        token = self.forcing.pop(0)
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[:, token] = 0.0
        return forced


TAIL = 16  # more tokens than a tag takes


def _ends_with(seq: list[int], end: list[int]) -> bool:
    return bool(end) and len(seq) >= len(end) and seq[-len(end):] == end
