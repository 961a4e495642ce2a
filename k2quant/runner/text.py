"""Text around the engine: prompts in K2's chat format, and token ids to text as they stream.

`TextStream` turns ids into text that is safe to print at once: never a broken UTF-8
sequence (bytes are held until a character is complete), never the start of a stop string
that may still be completing (held until it is ruled out), and nothing after a stop string.
`ThinkingFilter` shows the text between `<think>` and `</think>` dimmed, or hides it.
"""

from __future__ import annotations

import codecs

from k2quant.formats.tokenizer import K2Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DIM, RESET = "\x1b[2m", "\x1b[0m"


class TextStream:
    def __init__(self, tok: K2Tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tok
        self.stop = tuple(s for s in stop if s)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released (could be the start of a stop string)
        self.text = ""  # everything released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text that became printable with this token ('' while a character or a stop string is incomplete)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self.tok.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, at the end of generation."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        for s in self.stop:
            i = held.find(s)
            if i >= 0:
                self.stopped = True
                self._held = ""
                return self._emit(held[:i])
        keep = 0
        if not final:  # hold the longest tail that is a prefix of some stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(held)), 0, -1):
                    if held.endswith(s[:n]):
                        keep = max(keep, n)
                        break
        out, self._held = (held[: len(held) - keep], held[len(held) - keep :]) if keep else (held, "")
        return self._emit(out)

    def _emit(self, s: str) -> str:
        self.text += s
        return s


class ThinkingFilter:
    """Streamed text with the reasoning between <think> and </think> dimmed (or dropped with hide=True)."""

    def __init__(self, hide: bool = False, color: bool = True):
        self.hide, self.color = hide, color
        self.inside = False
        self._tail = ""

    def push(self, s: str, final: bool = False) -> str:
        s = self._tail + s
        self._tail = ""
        out = []
        while s:
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            i = s.find(tag)
            if i < 0:
                keep = 0 if final else next((n for n in range(min(len(tag) - 1, len(s)), 0, -1)
                                             if s.endswith(tag[:n])), 0)  # fmt: skip
                out.append(self._show(s[: len(s) - keep]))
                self._tail = s[len(s) - keep :]
                break
            out.append(self._show(s[:i]))
            if not self.hide:
                out.append(f"{DIM}{tag}{RESET}" if self.color else tag)
            self.inside = not self.inside
            s = s[i + len(tag) :]
        return "".join(out)

    def _show(self, s: str) -> str:
        if not s or not self.inside:
            return s
        if self.hide:
            return ""
        return f"{DIM}{s}{RESET}" if self.color else s
