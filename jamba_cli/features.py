"""What a request asks of the chat template and of the reply, in one place for run, chat and serve.

`Features` holds the tools, documents, citation mode and thinking switches of a request: it gives the chat
template its variables (`tools`, `documents`, `knobs`, `enable_thinking`, named as transformers'
`apply_chat_template` passes them) and the logits processors (the reasoning budget). `ReplyReader` reads a
streamed reply: reasoning and answer apart, tool-call and citation markup held back from the answer's stream
and parsed at the end into a `Reply`. Nothing here prints; each front end shows a `Reply` its own way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import documents as docs
from . import reasoning, tools
from .errors import UsageError


@dataclass(frozen=True)
class Features:
    """Args:
        tools: OpenAI function definitions (`tools.check_tools`), or None.
        documents: `{"title", "text", ...}` objects for the template's documents section, or None.
        citations: citation mode (the Jamba 1.5-1.7 template's `citation_mode: "fast"` knob).
        think: True/False for `--think/--no-think`; None leaves the template's default.
        reasoning_budget: most thinking tokens before the closing tag is forced; None: no limit.
    """

    tools: list[dict] | None = None
    documents: list[dict] | None = None
    citations: bool = False
    think: bool | None = None
    reasoning_budget: int | None = None

    @property
    def any(self) -> bool:
        return bool(self.tools or self.documents or self.citations or self.think is not None
                    or self.reasoning_budget is not None)

    def check(self, tokenizer) -> None:
        """Refuse what this model's chat template cannot do.

        Raises:
            UsageError: naming the parameter (`think`, `reasoning_budget`, `tools`, ...).
        """
        template = tokenizer.chat_template
        if self.reasoning_budget is not None and self.reasoning_budget < 0:
            raise UsageError("`reasoning_budget` must be 0 or more")
        if self.any and template is None:
            asked = next(name for name, on in (("tools", self.tools), ("documents", self.documents),
                                               ("citations", self.citations), ("think", self.think is not None),
                                               ("reasoning_budget", self.reasoning_budget is not None)) if on)
            raise UsageError(f"`{asked}` needs the model's own chat template, and this model ships none")
        thinks = reasoning.template_thinks(template)
        if self.think and not thinks:
            raise UsageError("`think`: this model's chat template has no thinking mode")
        if self.reasoning_budget is not None and not thinks:
            raise UsageError("`reasoning_budget`: this model's chat template has no thinking mode")

    def template_kwargs(self, tokenizer) -> dict:
        """The chat template's variables for this request (only those set)."""
        out = {}
        if self.tools:
            out["tools"] = self.tools
        if self.documents:
            out["documents"] = self.documents
        if self.citations:
            out["knobs"] = dict(docs.CITATION_KNOBS)
        out.update(reasoning.thinking_variables(tokenizer.chat_template, self.think))
        return out

    def budget(self, tokenizer) -> int | None:
        """The thinking budget in tokens: `--no-think` on a template that always thinks (it has no switch)
        is a budget of 0."""
        if self.think is False and not reasoning.thinking_variables(tokenizer.chat_template, False):
            return 0
        return self.reasoning_budget

    def logits_processors(self, tokenizer, thinking: bool) -> list:
        """Processors for one reply; `thinking`: the prompt left `<think>` open."""
        budget = self.budget(tokenizer)
        return [] if budget is None else [reasoning.ReasoningBudget(tokenizer, budget, thinking)]


@dataclass
class Reply:
    """A finished reply: the answer, the reasoning (None: the model did not think), the tool calls, the cited
    documents (None: citation mode was off), and notes for the user about markup that did not parse."""

    content: str
    reasoning: str | None = None
    tool_calls: list[tools.ToolCall] = field(default_factory=list)
    citations: list[dict] | None = None
    notes: list[str] = field(default_factory=list)

    def message(self) -> dict:
        """The reply as the assistant message a chat history keeps: `reasoning_content` and `tool_calls`
        apart from the content, as both templates expect of earlier turns (the Reasoning-3B template drops
        the reasoning of turns before the last question; Jamba 1.7 renders `tool_calls` as `<tool_calls>`)."""
        out = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = tools.history_calls(self.tool_calls)
        if self.citations:
            out["citations"] = [{"document_id": c["document_id"]} for c in self.citations]
        return out

    def fields(self) -> dict:
        """The `run --format json` fields beyond `text`: `reasoning`, `tool_calls`, `citations` where they
        apply."""
        out = {}
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [c.record() for c in self.tool_calls]
        if self.citations is not None:
            out["citations"] = self.citations
        return out


class ReplyReader:
    """Read a reply as it streams: `feed(text)` returns the pieces to show now, as (kind, text) with kind
    "reasoning" or "content"; `finish()` returns the last pieces and the `Reply`.

    Answer text from a tool-call marker (with `features.tools`) or a citation marker (with
    `features.citations`) on is held back and parsed at the end; when it does not parse it is released as
    answer text, with a note.

    Args:
        thinking: the prompt left `<think>` open (`reasoning.prompt_opens_thinking`).
    """

    def __init__(self, features: Features, thinking: bool = False):
        self.features = features
        self.splitter = reasoning.ThinkSplitter(thinking)
        self.markers = ((tools.OPENERS if features.tools else ()) + ((docs.OPENER,) if features.citations else ()))
        self.streamed: list[str] = []  # answer text shown so far
        self.held: str | None = None  # answer text from a marker on
        self.pending = ""  # answer text that may be the start of a marker

    def feed(self, text: str) -> list[tuple[str, str]]:
        return self._route(self.splitter.feed(text))

    def _route(self, pieces) -> list[tuple[str, str]]:
        out = []
        for kind, text in pieces:
            if kind == "content":
                text = self._hold(text)
                if text:
                    self.streamed.append(text)
                    out.append(("content", text))
            else:
                out.append((kind, text))
        return out

    def _hold(self, text: str) -> str:
        if self.held is not None:
            self.held += text
            return ""
        buf, self.pending = self.pending + text, ""
        hits = [i for i in (buf.find(m) for m in self.markers) if i >= 0]
        if hits:
            self.held = buf[min(hits):]
            return buf[:min(hits)]
        keep = max((k for m in self.markers for k in range(min(len(m) - 1, len(buf)), 0, -1)
                    if buf.endswith(m[:k])), default=0)
        self.pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def finish(self) -> tuple[list[tuple[str, str]], Reply]:
        out = self._route(self.splitter.flush())
        streamed = "".join(self.streamed)
        whole = streamed + (self.held or "") + self.pending
        notes, calls, cited = [], [], None
        content = whole
        if self.features.citations:
            count = len(self.features.documents or [])
            parsed = docs.parse_citations(content, count)
            content = parsed.content
            notes += [parsed.note] if parsed.note else []
            cited = parsed.records(self.features.documents or []) if parsed.ids is not None else []
        if self.features.tools:
            parsed = tools.parse_tool_calls(content)
            content, calls = parsed.content, parsed.calls
            notes += [parsed.note] if parsed.note else []
        if content.startswith(streamed) and len(content) > len(streamed):
            rest = content[len(streamed):]
            self.streamed.append(rest)
            out.append(("content", rest))
        thought = "".join(self.splitter.reasoning).strip() if self.splitter.entered else None
        reply = Reply(content.strip() if (calls or cited is not None) else content, thought, calls, cited, notes)
        return out, reply


def check_request_tools(value, where: str = "`tools`") -> list[dict] | None:
    """serve's `tools` field (None passes)."""
    return None if value is None else tools.check_tools(value, where)


def check_request_documents(value, where: str = "`documents`") -> list[dict] | None:
    """serve's `documents` extension field (None passes)."""
    return None if value is None else docs.check_documents(value, where)

