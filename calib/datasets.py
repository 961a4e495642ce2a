"""Calibration and training text: the bundled set and user files (.txt, .jsonl)."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from k2quant.errors import K2QuantError
from k2quant.formats.tokenizer import render_chat


class DataError(K2QuantError, ValueError):
    """A calibration or evaluation text file that cannot be read; names the file (and line).
    A ValueError too, as these errors were before."""


def bundled_texts(render: Callable[[list[dict], list[dict] | None], str] | None = None) -> dict[str, str]:
    """The text written for k2quant (English and Chinese prose, agentic transcripts), by file name;
    transcripts rendered by `render(messages, tools)` (default: K2's chat format, `render_chat`)."""
    out = {}
    root = resources.files("k2quant.calib") / "data"
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".txt"):
            out[entry.name] = entry.read_text(encoding="utf-8")
        elif entry.name.endswith(".jsonl"):
            out[entry.name] = "".join(jsonl_documents(entry.read_text(encoding="utf-8"), entry.name, render))
    return out


def heldout_text() -> str:
    """Evaluation text that neither mini-K2's training nor any calibration set reads: English and
    Chinese prose written for the project, kept apart in calib/heldout/ (the benches' and the
    tests' held-out text; test_datasets checks it is disjoint from both)."""
    root = resources.files("k2quant.calib") / "heldout"
    return "\n\n".join(entry.read_text(encoding="utf-8") for entry in sorted(root.iterdir(), key=lambda p: p.name)
                         if entry.name.endswith(".txt"))  # fmt: skip


def jsonl_documents(text: str, source: str = "<jsonl>",
                    render: Callable[[list[dict], list[dict] | None], str] | None = None) -> list[str]:  # fmt: skip
    """One document per line: {"text": ...} as is, {"messages": [...], "tools": [...]} rendered by `render`
    (default: K2's chat format without a generation prompt)."""
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: not JSON, an int of 5000 digits
            raise DataError(f"{source}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}:{lineno}: expected an object with a 'text' or 'messages' field")
        if "text" in obj:
            if not isinstance(obj["text"], str):
                raise DataError(f"{source}:{lineno}: 'text' is a {type(obj['text']).__name__}, not a string")
            docs.append(obj["text"])
        elif "messages" in obj:
            try:
                if render is None:
                    docs.append(render_chat(obj["messages"], obj.get("tools"), add_generation_prompt=False))
                else:
                    docs.append(render(obj["messages"], obj.get("tools")))
            except K2QuantError as e:  # the chat format's error names the template, not this line
                raise DataError(f"{source}:{lineno}: {e}") from None
        else:
            raise DataError(f"{source}:{lineno}: expected a 'text' or 'messages' field")
    return docs


def load_texts(paths: list[str | Path]) -> list[str]:
    """Documents from .txt (one document per file) and .jsonl files."""
    docs = []
    for p in map(Path, paths):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e})") from None
        docs.extend(jsonl_documents(text, str(p)) if p.suffix == ".jsonl" else [text])
    return docs


def bundled_documents(generated: bool = True) -> list[str]:
    """The default calibration set as documents: the hand-written files (prose whole, each
    transcript its own document), then, with `generated`, k2quant's generated math and
    agentic transcripts and its own source code (calib/generated.py)."""
    docs = []
    root = resources.files("k2quant.calib") / "data"
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        text = entry.read_text(encoding="utf-8")
        if entry.name.endswith(".jsonl"):
            docs.extend(jsonl_documents(text, entry.name))
        elif entry.name.endswith(".txt"):
            docs.append(text)
    if generated:
        from .generated import agentic_documents, code_documents, math_documents

        docs += math_documents() + agentic_documents() + code_documents()
    return docs


def sample_sequences(stream: list[int], n: int, ctx: int) -> list[list[int]]:
    """n windows of ctx tokens spread evenly over the token stream (deterministic; windows overlap
    when the stream is shorter than n * ctx)."""
    if len(stream) < ctx:
        raise ValueError(f"calibration text has {len(stream)} tokens, fewer than one sequence of {ctx}")
    last = len(stream) - ctx
    starts = [round(i * last / max(n - 1, 1)) for i in range(n)]
    return [stream[s : s + ctx] for s in starts]
