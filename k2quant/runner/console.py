"""`k2quant run` in a terminal: one prompt or a chat, text streamed as it is made, statistics after.

A prompt is sent as one user turn through the model's own chat template (K2's format when
it has none; with `--system`, or the template's default system prompt), unless `--raw`.
`--chat` keeps the conversation: each turn is the whole history rendered again, and the
engine reuses the cached prefix, so only the new turn is prefilled. Generation stops at
`<|im_end|>`, `[EOS]` or `[EOT]`, at a `--stop` string, at `--max-tokens` or at the end of
the context.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from k2quant.errors import K2QuantError

from .engine import Sampling
from .runner import Runner
from .text import TextStream, ThinkingFilter

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*")


def parse_bytes(text: str, option: str) -> int:
    """'20G' = 20 x 10^9, '20GiB' = 20 x 2^30, '512M', '1000000' -> bytes."""
    m = _SIZE.fullmatch(text.upper())
    if not m:
        raise K2QuantError(f"{option} {text!r}: expected a size such as 20G, 20GiB or 512M")
    unit = " KMGT".index(m.group(2) or " ")
    base = 1024 if m.group(3).startswith("I") else 1000
    return int(float(m.group(1)) * base**unit)


@dataclass
class Turn:
    text: str
    ids: list[int]
    seconds: float


def stop_ids(tok) -> tuple[int, ...]:
    return tuple(tok.special(s) for s in ("<|im_end|>", "[EOS]", "[EOT]") if s in tok.encoding._special_tokens)


def answer(runner: Runner, prompt_ids: list[int], sampling: Sampling, stop: tuple[str, ...],
           write: Callable[[str], None] | None, think: ThinkingFilter | None) -> Turn:  # fmt: skip
    """Generate one answer, streaming its text to `write` (when given)."""
    stream = TextStream(runner.tokenizer, stop)
    ids: list[int] = []
    t0 = time.perf_counter()
    gen = runner.generate(prompt_ids, sampling)
    for t in gen:
        ids.append(t)
        piece = stream.push(t)
        if write is not None and piece:
            write(think.push(piece) if think else piece)
        if stream.stopped:
            gen.close()
            runner.engine.stats.finish_reason = "stop"
            break
    rest = stream.finish()
    if write is not None:
        write((think.push(rest, final=True) if think else rest) + "\n")
    return Turn(stream.text, ids, time.perf_counter() - t0)


def format_report(r: dict) -> str:
    p = r["placement"]
    share = r["gpu_share_of_routed_work"]
    bpt = r["bytes_per_token"]
    lines = [
        f"prompt: {r['prompt_tokens']} tokens ({r['cached_tokens']} from the cache), "
        f"{r['prefill_tokens_per_s']:.1f} tokens/s; decode: {r['decode_tokens']} tokens, "
        f"{r['decode_tokens_per_s']:.2f} tokens/s ({r['finish_reason']})",
        f"device {r['device']}, {r['threads']} CPU threads, {r['mode']} kernels; GPU: "
        f"{p['gpu_dense_tensors']} dense tensors + {p['gpu_routed_experts_now']} routed experts "
        f"({p['gpu_bytes'] / 2**30:.2f} GiB placed, {p['promotions']} promoted, {p['evictions']} evicted)",
        f"GPU share of routed-expert work: {100 * share['pairs']:.1f}% of (token, expert) pairs, "
        f"{100 * share['bytes']:.1f}% of bytes",
        f"bytes read per token: {bpt['gpu'] / 1e6:.1f} MB from VRAM, {bpt['cpu'] / 1e6:.1f} MB from RAM; "
        f"RAM bandwidth {r['ram_bandwidth'] / 1e9:.1f} GB/s ({r['ram_bandwidth_source']}) -> CPU bound "
        f"{r['cpu_bound_tokens_per_s']:.1f} tokens/s"
        + (f", decode at {r['ratio_to_bound']:.2f} of it" if r["ratio_to_bound"] else ""),
        f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB for {r['packed_cpu_bytes'] / 2**30:.2f} GiB of packed weights "
        f"in RAM + {r['kv_cache_bytes'] / 2**20:.1f} MiB KV cache"
        + (f"; VRAM peak {r['vram_peak'] / 2**30:.2f} GiB" if r["vram_peak"] else ""),
    ]
    return "\n".join(lines)


def run_console(runner: Runner, prompt: str | None, chat: bool, system: str | None, raw: bool,
                sampling: Sampling, stop: tuple[str, ...], hide_thinking: bool, as_json: bool) -> None:  # fmt: skip
    tok = runner.tokenizer
    if tok is None:
        raise K2QuantError(f"{runner.path}: no tiktoken.model beside the model; k2quant run needs K2's tokenizer")
    sampling.stop_ids = sampling.stop_ids or stop_ids(tok)
    color = sys.stdout.isatty()
    out = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if not as_json else None  # noqa: E731
    if not chat:
        text = prompt if raw else runner.template.render(([{"role": "system", "content": system}] if system else [])
                                                         + [{"role": "user", "content": prompt}])  # fmt: skip
        ids = tok.encode(text, allow_special=not raw)
        turn = answer(runner, ids, sampling, stop, out, ThinkingFilter(hide_thinking, color))
        report = runner.report()
        if as_json:
            print(json.dumps({"text": turn.text, "token_ids": turn.ids, "stats": report}, indent=1))
        else:
            print(format_report(report), file=sys.stderr)
        return
    messages = [{"role": "system", "content": system}] if system else []
    print("k2quant chat: type a message, /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(runner.template.render(messages), allow_special=True)
        turn = answer(runner, ids, sampling, stop, out or print, ThinkingFilter(hide_thinking, color))
        messages.append({"role": "assistant", "content": turn.text})
        st = runner.engine.stats
        print(f"[{st.prompt_tokens - st.cached_tokens} new prompt tokens, {st.decode_tokens} tokens at "
              f"{st.decode_tps:.2f} tokens/s]", file=sys.stderr)  # fmt: skip
    print(format_report(runner.report()), file=sys.stderr)
