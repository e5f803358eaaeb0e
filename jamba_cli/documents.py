"""Grounded answers: documents for the chat template's documents section, and the citations a reply ends with.

`--doc FILE` takes a text file (its title is the file's name) or a JSON/JSONL file of `{"title", "text", ...}`
objects (other keys are shown to the model too, as the Jamba 1.7 template does). In citation mode the model
ends its answer with `<citations>[ids]</citations>`, the indices of the documents it used; `parse_citations`
takes them off the answer. Pure functions over text, shared by run, chat and serve.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

CITATION_KNOBS = {"is_set": True, "citation_mode": "fast"}  # the Jamba 1.5-1.7 template's citation mode
OPENER = "<citations>"
_CITATIONS = re.compile(r"<citations>(.*?)(?:</citations>|$)", re.S)
MAX_DOCUMENT_BYTES = 64 << 20  # as a prompt file: far more than the largest context takes


def check_documents(documents, where: str = "`documents`") -> list[dict]:
    """Documents as the chat template takes them: each an object with a `text` (text) and optionally a
    `title` (text); other keys are kept (the template shows them as `Key: value`).

    Raises:
        UsageError: naming `where` and the entry at fault.
    """
    if not isinstance(documents, list):
        raise UsageError(f"{where} must be a list of {{\"title\", \"text\"}} objects")
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise UsageError(f"{where}: document {i} must be an object with a \"text\"")
        if not isinstance(doc.get("text"), str):
            raise UsageError(f"{where}: document {i} needs a \"text\" (text)")
        if "title" in doc and not isinstance(doc["title"], str):
            raise UsageError(f"{where}: document {i}: \"title\" must be text")
    return documents


def load_documents(paths: list[str | Path]) -> list[dict]:
    """The documents in `paths`, in order: a `.json` file holds one object or a list of them, a `.jsonl`
    file one object a line; any other file is one document of text titled with the file's name.

    Raises:
        UsageError: a file cannot be read, is not UTF-8 JSON where JSON is expected, or an entry lacks its
            text (the message names the file, and the line of a JSONL file).
    """
    from .files import read_named

    out = []
    for raw in paths:
        path, data = read_named(raw, "doc", "document", MAX_DOCUMENT_BYTES)
        text = data.decode("utf-8", errors="replace")
        suffix = path.suffix.lower()
        if suffix == ".json":
            value = _json(text, f"document {path}")
            out += check_documents(value if isinstance(value, list) else [value], f"document {path}")
        elif suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    out += check_documents([_json(line, f"document {path} line {n}")], f"document {path} line {n}")
        else:
            out.append({"title": path.name, "text": text})
    return out


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{what} is not JSON: {e}") from None


@dataclass(frozen=True)
class ParsedCitations:
    """An answer without its citation section, the cited document ids (None: the model gave none), and a
    note when a citation section was there but did not parse (it is then left in the answer)."""

    content: str
    ids: list[int] | None
    note: str | None = None

    def records(self, documents: list[dict]) -> list[dict]:
        """The citations as `{"document_id", "title"}` objects (the template's own form, with the title)."""
        out = []
        for i in self.ids or []:
            title = documents[i].get("title") if 0 <= i < len(documents) else None
            out.append({"document_id": i, "title": title})
        return out


def parse_citations(text: str, count: int | None = None) -> ParsedCitations:
    """Take `<citations>[ids]</citations>` off the end of an answer. `count`: how many documents there were;
    an id outside them is dropped with a note."""
    match = _CITATIONS.search(text)
    if match is None:
        return ParsedCitations(text, None)
    body = match.group(1).strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        return ParsedCitations(text, None, f"the model's citations are not a list of document ids ({body[:40]}); "
                                           "they are shown as text")
    note = None
    if count is not None and any(not 0 <= i < count for i in value):
        note = f"the model cited documents that do not exist ({', '.join(str(i) for i in value if not 0 <= i < count)})"
        value = [i for i in value if 0 <= i < count]
    content = (text[:match.start()] + text[match.end():]).rstrip()
    return ParsedCitations(content, list(dict.fromkeys(value)), note)


def sources_line(citations: list[dict]) -> str:
    """`Sources: [0] report.md, [2] notes.txt` for a terminal; `Sources: none` when the model cited nothing."""
    if not citations:
        return "Sources: none"
    return "Sources: " + ", ".join(f"[{c['document_id']}] {c['title'] or '(untitled)'}" for c in citations)
