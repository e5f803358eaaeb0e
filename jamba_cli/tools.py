"""Tools (function calling): OpenAI function schemas in, the model's tool-call text out as structured calls.

Two formats, by model family: Jamba 1.5-1.7 write one `<tool_calls>[{"name": ..., "arguments": {...}}, ...]
</tool_calls>` JSON array; the ChatML family (Jamba-Reasoning-3B, Jamba2) writes Hermes-style blocks,
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one per call. Both are parsed here, as pure
functions over text, so `run`, `chat` and `serve` share them. Text that looks like a call but does not parse is
handed back as text with a note: a model's malformed output is never an error.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

# the markers a reply's tool calls start with (what a streaming reader holds back once seen)
OPENERS = ("<tool_calls>", "<tool_call>")
_JAMBA = re.compile(r"<tool_calls>(.*?)(?:</tool_calls>|$)", re.S)
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
MAX_TOOLS_BYTES = 16 << 20  # a tools file far larger than any context could hold is refused unread


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: the function's name and its arguments (usually an object)."""

    name: str
    arguments: object
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self) -> dict:
        """The call as an OpenAI `tool_calls` entry (arguments as a JSON string, as the API sends them)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": _as_json(self.arguments)}}

    def record(self) -> dict:
        """The call as a `{"type": "tool_call", ...}` record of `run --format json/jsonl`."""
        return {"type": "tool_call", "id": self.id, "name": self.name, "arguments": self.arguments}

    def shown(self) -> str:
        """One line for a person: `get_weather({"city": "Paris"})`."""
        return f"{self.name}({_as_json(self.arguments)})"


@dataclass(frozen=True)
class ParsedCalls:
    """A reply split into its text and its tool calls; `note` says why tool-call text was kept as text."""

    content: str
    calls: list[ToolCall]
    note: str | None = None


def _as_json(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_tool_calls(text: str) -> ParsedCalls:
    """Split `text` (a whole reply) into content and tool calls, in either family's format.

    The content is the text before the first tool-call marker (and any after the calls). A marker whose
    JSON does not parse, or lacks a function name, leaves the whole text as content, with a note.
    """
    starts = [i for i in (text.find(m) for m in OPENERS) if i >= 0]
    if not starts:
        return ParsedCalls(text, [])
    at = min(starts)
    jamba = text.startswith("<tool_calls>", at)
    pattern = _JAMBA if jamba else _HERMES
    calls, rest, end = [], [], at
    for match in pattern.finditer(text, at):
        rest.append(text[end:match.start()])
        end = match.end()
        body = match.group(1).strip()
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return ParsedCalls(text, [], f"the model's tool call is not valid JSON ({_short(body)}); "
                                         "it is shown as text")
        items = value if jamba and isinstance(value, list) else [value]
        for item in items:
            call = _call(item)
            if call is None:
                return ParsedCalls(text, [], f"the model's tool call has no function name ({_short(body)}); "
                                             "it is shown as text")
            calls.append(call)
    rest.append(text[end:])
    content = (text[:at] + "".join(rest)).strip() if calls else text[:at]
    return ParsedCalls(content, calls)


def _call(item) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # an OpenAI-shaped call
        item = item["function"]
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models quote the object
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return ToolCall(name, arguments)


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def check_tools(tools, where: str = "`tools`") -> list[dict]:
    """OpenAI tool definitions, each checked: `{"type": "function", "function": {"name", "description",
    "parameters"}}`, or the bare function object (what the Jamba 1.7 template also takes). Returned as
    given, for the chat template.

    Raises:
        UsageError: naming `where` and the entry at fault.
    """
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):  # {"tools": [...]}, as in a request
        tools = tools["tools"]
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not tools:
        raise UsageError(f"{where} must be a list of function definitions")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise UsageError(f"{where}: entry {i} must be an object")
        function = tool
        if "type" in tool:
            if tool["type"] != "function":
                raise UsageError(f"{where}: entry {i} has type {json.dumps(tool['type'])}; only \"function\" "
                                 "is supported")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise UsageError(f"{where}: entry {i} needs a \"function\" object")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise UsageError(f"{where}: entry {i} needs a \"name\" (text)")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise UsageError(f"{where}: entry {i} ({function['name']}): \"parameters\" must be a JSON schema "
                             "object")
    return tools


def load_tools(path: str | Path) -> list[dict]:
    """The tool definitions in a JSON file: a list of them, one, or `{"tools": [...]}`.

    Raises:
        UsageError: the file cannot be read, is not JSON, or an entry is malformed (named).
    """
    from .files import read_named

    path, data = read_named(path, "tools", "tools file", MAX_TOOLS_BYTES)
    try:
        tools = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise UsageError(f"tools file {path} is not JSON: {e}") from None
    return check_tools(tools, where=f"tools file {path}")


def tool_names(tools: list[dict]) -> list[str]:
    return [(t.get("function") if "type" in t else t)["name"] for t in tools]


def history_calls(calls: list[ToolCall]) -> list[dict]:
    """Calls as an assistant message's `tool_calls`, the form both chat templates render."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def tool_result(name: str, content) -> dict:
    """A tool's result as the message that feeds it back: role `tool`, which both templates render (Jamba
    1.7 as `<|tool|> (name)...`, ChatML inside `<tool_response>`). A non-text result is sent as JSON."""
    return {"role": "tool", "name": name, "content": content if isinstance(content, str) else
            json.dumps(content, ensure_ascii=False)}
