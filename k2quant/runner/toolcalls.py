"""K2's output text split into content, reasoning and tool calls, at once (`parse`) or as it streams (`OutputStream`).

Contract
--------
Input: the text the model generated, decoded with its special tokens as their literal strings (`<think>`,
`<|tool_calls_section_begin|>`, ...). Output: the OpenAI assistant-message fields `content`, `reasoning_content`
and `tool_calls`, as one `Parsed`, or as `Delta`s while streaming. Pure: no torch, no I/O. Model output never
raises: what cannot be read as tool calls comes back as content, so no generated text is lost (only the markers
of well-formed parts, and whitespace before an opening `<think>`, are dropped). An empty string means "none".

K2's conventions, as vLLM's `kimi_k2` tool parser and `KimiK2ReasoningParser` read them:

    output  := [ws "<think>"] reasoning ["</think>"] (content | section)*
    section := "<|tool_calls_section_begin|>" ws (call ws)+ "<|tool_calls_section_end|>"
    call    := "<|tool_call_begin|>" ws ID ws "<|tool_call_argument_begin|>" ws ARGS ws "<|tool_call_end|>"

Rules
-----
1. Reasoning opens when the output starts with `<think>` (whitespace before it is dropped), or at the first
   character when `in_reasoning=True` (the prompt already opened `<think>`; a leading `<think>` is then consumed
   as well). It ends at the first `</think>` (dropped) or implicitly at the first `<|tool_calls_section_begin|>`
   (which opens a section); if neither comes, all of the output is reasoning. Other markers inside reasoning are
   literal reasoning text. Otherwise there is no reasoning: a later `<think>` is just content.
2. Content is everything outside reasoning and well-formed sections, verbatim: text before a section, text
   after its end, stray markers (in content only `<|tool_calls_section_begin|>` is special).
3. A section runs from `<|tool_calls_section_begin|>` to the first `<|tool_calls_section_end|>` after it, or to
   the end of the output. It is well-formed when it ends, holds one or more calls separated only by whitespace,
   and every call has `<|tool_call_begin|>`, an ID (stripped) matching `NAME:DIGITS` without whitespace or `<`
   and with a non-empty name, `<|tool_call_argument_begin|>`, arguments without a section or call marker
   inside, `<|tool_call_end|>`, and its stripped arguments are valid JSON (`json.loads` succeeds). Each call
   becomes `ToolCall(id=ID verbatim, name=ID.split(":")[0].split(".")[-1], arguments=the stripped text as the
   model wrote it)`; indices count on across sections. A section that is not well-formed is all or nothing: it
   yields no call at all, even if some of its calls were good, and its raw text (markers included) is content.
4. `prefix` is text the server forced at the start of the answer (`SECTION_BEGIN` for tool_choice "required";
   `SECTION_BEGIN + CALL_BEGIN + "functions.NAME:0" + ARGUMENT_BEGIN` for a named function). It is read as if
   the model had written it before its output, so in a fallback it is part of the content.
5. `tools=False` (no tools in the request, or tool_choice "none"): no section is read, its markers are content,
   as vLLM leaves them when no tool parser runs; reasoning then ends only at `</think>`.

Streaming (`OutputStream`)
--------------------------
- `push(text)` returns the deltas the new text made certain; `finish()` returns the rest, at the end of
  generation (a partial marker as plain text, an unended section as content). Adjacent content (or reasoning)
  text released by one call comes as one delta.
- Content and reasoning leave as soon as they cannot be the start of a marker: only a possible partial marker at
  the end (`<|tool_ca`, `</thi`; at the very start, whitespace and `<thi` while a `<think>` may follow) is held.
- A section is held whole until its `<|tool_calls_section_end|>`, the first moment it is known to be
  well-formed (a stream cannot take back a call it sent, and an unended section or a bad later call turns all
  of it into content). Then, for each call in order: `ToolCallDelta(index, id, name, "")`, followed by one
  `ToolCallDelta(index, None, None, piece)` per non-empty piece of its arguments as they arrived: the stripped
  arguments cut at the boundaries of the pushes (markers are never inside arguments, so never split). A
  malformed section comes out as one content delta of its raw text.
- The deltas of any split of a text, concatenated (arguments by index), equal `parse` of the whole text: `parse`
  is the stream fed in one push. `tool_calls_emitted` tells the server whether finish_reason is "tool_calls".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (THINK_BEGIN, THINK_END, SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)

_ID = re.compile(r"[^\s<]+:[0-9]+")
_SECTION_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)  # structure inside a section
_REASONING_ENDS = (THINK_END, SECTION_BEGIN)

_START, _REASONING, _CONTENT, _SECTION = "start", "reasoning", "content", "section"


@dataclass
class ToolCall:
    id: str  # as the model wrote it, e.g. "functions.get_weather:0"; OpenAI's tool_calls[].id
    name: str  # "get_weather"
    arguments: str  # a JSON text, stripped, as the model wrote it


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None  # set (with name) on a call's first delta only, whose arguments are ""
    name: str | None
    arguments: str  # a fragment of the arguments on later deltas


@dataclass(frozen=True)
class Delta:
    """Exactly one of content, reasoning or tool_call is set (not None)."""

    content: str | None = None
    reasoning: str | None = None
    tool_call: ToolCallDelta | None = None

    def __post_init__(self) -> None:
        if (self.content is not None) + (self.reasoning is not None) + (self.tool_call is not None) != 1:
            raise ValueError("a Delta carries exactly one of content, reasoning, tool_call")


def parse(text: str, in_reasoning: bool = False, prefix: str = "", tools: bool = True) -> Parsed:
    """The whole output `text` split into content, reasoning and tool calls (rules in the module docstring)."""
    stream = OutputStream(in_reasoning=in_reasoning, prefix=prefix, tools=tools)
    deltas = stream.push(text) + stream.finish()
    parsed = Parsed()
    content, reasoning = [], []
    for d in deltas:
        if d.content is not None:
            content.append(d.content)
        elif d.reasoning is not None:
            reasoning.append(d.reasoning)
        elif d.tool_call.id is not None:
            parsed.tool_calls.append(ToolCall(d.tool_call.id, d.tool_call.name or "", ""))
        else:
            parsed.tool_calls[d.tool_call.index].arguments += d.tool_call.arguments
    parsed.content, parsed.reasoning = "".join(content), "".join(reasoning)
    return parsed


class OutputStream:
    """Incremental `parse`: push the decoded text as it comes, then finish (streaming rules in the module docstring)."""

    def __init__(self, in_reasoning: bool = False, prefix: str = "", tools: bool = True):
        self.in_reasoning = in_reasoning
        # tools=False (a request without tools, or tool_choice "none"): sections are plain content, as vLLM
        # leaves them when no tool parser runs; reasoning then ends at </think> only
        self.tools = tools
        self._reasoning_ends = _REASONING_ENDS if tools else (THINK_END,)
        self.tool_calls_emitted = False  # a tool-call delta was returned: finish_reason "tool_calls"
        self._state = _START
        self._buf = ""  # text not yet released; in a section, all of it from SECTION_BEGIN on
        self._cuts: list[int] = []  # in a section: offsets in _buf where a push ended
        self._scan = 0  # in a section: where to look for SECTION_END next
        self._index = 0  # of the next tool call
        self._out: list[Delta] = []  # deltas made but not yet returned (the prefix's go out with the first call)
        self._finished = False
        self._feed(prefix, final=False)

    def push(self, text: str) -> list[Delta]:
        """Deltas made certain by `text`, the next piece of the output."""
        if self._finished:
            raise RuntimeError("OutputStream.push() after finish()")
        self._feed(text, final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """The deltas still held, at the end of generation."""
        if self._finished:
            return []
        self._feed("", final=True)
        self._finished = True
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _feed(self, text: str, final: bool) -> None:
        self._buf += text
        while self._step(final):
            pass
        if self._state == _SECTION:
            self._cuts.append(len(self._buf))

    def _step(self, final: bool) -> bool:
        """Advance through `_buf` by one state; False when it must wait for more text (or all is released)."""
        buf = self._buf
        if self._state == _START:
            rest = buf.lstrip()
            if rest.startswith(THINK_BEGIN):
                self._buf, self._state = rest[len(THINK_BEGIN) :], _REASONING
                return True
            if not final and THINK_BEGIN.startswith(rest):  # only whitespace and maybe the start of <think> yet
                return False
            self._state = _REASONING if self.in_reasoning else _CONTENT
            return True

        if self._state == _REASONING:
            i, marker = _first(buf, self._reasoning_ends)
            if i < 0:
                self._release(buf, self._reasoning_ends, final, reasoning=True)
                return False
            self._text(buf[:i], reasoning=True)
            self._buf = buf[i + len(THINK_END) :] if marker == THINK_END else buf[i:]
            self._state = _CONTENT
            return True

        if self._state == _CONTENT:
            i = buf.find(SECTION_BEGIN) if self.tools else -1
            if i < 0:
                self._release(buf, (SECTION_BEGIN,) if self.tools else (), final, reasoning=False)
                return False
            self._text(buf[:i], reasoning=False)
            self._buf, self._state, self._cuts, self._scan = buf[i:], _SECTION, [], 0
            return True

        # _SECTION: hold until its end, then emit the calls or fall back to content
        j = buf.find(SECTION_END, self._scan)
        if j < 0:
            if final:  # a section that never ended
                self._text(buf, reasoning=False)
                self._buf, self._state = "", _CONTENT
            else:
                self._scan = max(0, len(buf) - len(SECTION_END) + 1)
            return False
        end = j + len(SECTION_END)
        raw = buf[:end]
        calls = _read_section(raw)
        if calls is None:
            self._text(raw, reasoning=False)
        else:
            for call in calls:
                self._out.append(Delta(tool_call=ToolCallDelta(self._index, call.id, call.name, "")))
                points = [call.start] + [c for c in self._cuts if call.start < c < call.end] + [call.end]
                for a, b in zip(points, points[1:], strict=False):
                    if b > a:
                        self._out.append(Delta(tool_call=ToolCallDelta(self._index, None, None, raw[a:b])))
                self._index += 1
            self.tool_calls_emitted = True
        self._buf, self._state = buf[end:], _CONTENT
        return True

    def _release(self, buf: str, markers: tuple[str, ...], final: bool, reasoning: bool) -> None:
        """Emit `buf` but for a tail that may still grow into one of `markers` (nothing held when final)."""
        keep = 0 if final else _partial_tail(buf, markers)
        self._text(buf[: len(buf) - keep], reasoning)
        self._buf = buf[len(buf) - keep :]

    def _text(self, text: str, reasoning: bool) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if reasoning:
            if last is not None and last.reasoning is not None:
                self._out[-1] = Delta(reasoning=last.reasoning + text)
            else:
                self._out.append(Delta(reasoning=text))
        elif last is not None and last.content is not None:
            self._out[-1] = Delta(content=last.content + text)
        else:
            self._out.append(Delta(content=text))


@dataclass
class _CallSpan:
    id: str
    name: str
    start: int  # the stripped arguments are raw[start:end] of their section
    end: int


def _first(text: str, markers: tuple[str, ...], start: int = 0, end: int | None = None) -> tuple[int, str]:
    """The earliest of `markers` in text[start:end]: (index, marker), or (-1, "")."""
    best, found = -1, ""
    for m in markers:
        i = text.find(m, start, len(text) if end is None else end)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, m
    return best, found


def _partial_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning (not all) of one of `markers`."""
    if not markers:
        return 0
    for n in range(min(len(text), max(len(m) for m in markers) - 1), 0, -1):
        tail = text[-n:]
        if any(len(m) > n and m.startswith(tail) for m in markers):
            return n
    return 0


def _read_section(raw: str) -> list[_CallSpan] | None:
    """The calls of a complete section (`raw` from SECTION_BEGIN through its SECTION_END), or None if malformed."""
    end = len(raw) - len(SECTION_END)
    pos = len(SECTION_BEGIN)
    calls: list[_CallSpan] = []
    while True:
        i, marker = _first(raw, _SECTION_MARKERS, pos, end)
        if i < 0:
            break
        if marker != CALL_BEGIN or raw[pos:i].strip():  # only whitespace between calls
            return None
        id_start = i + len(CALL_BEGIN)
        i, marker = _first(raw, _SECTION_MARKERS, id_start, end)
        if marker != ARGUMENT_BEGIN:
            return None
        call_id = raw[id_start:i].strip()
        name = call_id.split(":")[0].split(".")[-1]
        if not _ID.fullmatch(call_id) or not name:
            return None
        args_start = i + len(ARGUMENT_BEGIN)
        i, marker = _first(raw, _SECTION_MARKERS, args_start, end)
        if marker != CALL_END:
            return None
        args = raw[args_start:i]
        stripped = args.strip()
        try:
            json.loads(stripped)
        except (ValueError, RecursionError):
            return None
        start = args_start + len(args) - len(args.lstrip())
        calls.append(_CallSpan(call_id, name, start, start + len(stripped)))
        pos = i + len(CALL_END)
    if raw[pos:end].strip() or not calls:
        return None
    return calls
