"""Calibration and training text: the bundled set and user files (.txt, .jsonl)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from k2quant.formats.tokenizer import render_chat


def bundled_texts() -> dict[str, str]:
    """The text written for k2quant (English and Chinese prose, agentic transcripts), by file name."""
    out = {}
    root = resources.files("k2quant.calib") / "data"
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".txt"):
            out[entry.name] = entry.read_text(encoding="utf-8")
        elif entry.name.endswith(".jsonl"):
            out[entry.name] = "".join(jsonl_documents(entry.read_text(encoding="utf-8"), entry.name))
    return out


def jsonl_documents(text: str, source: str = "<jsonl>") -> list[str]:
    """One document per line: {"text": ...} as is, {"messages": [...], "tools": [...]} rendered in K2's chat format."""
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e})") from None
        if "text" in obj:
            docs.append(obj["text"])
        elif "messages" in obj:
            docs.append(render_chat(obj["messages"], obj.get("tools"), add_generation_prompt=False))
        else:
            raise ValueError(f"{source}:{lineno}: expected a 'text' or 'messages' field")
    return docs


def load_texts(paths: list[str | Path]) -> list[str]:
    """Documents from .txt (one document per file) and .jsonl files."""
    docs = []
    for p in map(Path, paths):
        text = p.read_text(encoding="utf-8")
        docs.extend(jsonl_documents(text, str(p)) if p.suffix == ".jsonl" else [text])
    return docs
