"""Benchmark: the runner over a long answer: 4096 tokens decoded in one generation, RSS and speed along it.

mini-K2 converted to `k2-int4` (INT4 g32 routed experts, the runner's fast CPU path), a 64-token
prompt, sampling at temperature 0.8 with no stop token (so the answer runs its full length), --ctx
4352. Printed: RSS (VmRSS, the process's resident memory now) at tokens 256, 1024, 2048 and 4096,
and decode tokens/s over the 128 tokens up to token 256 and up to token 4096, each against issue 17's
acceptance: RSS growth after token 256 under 50 MB, speed at token 4096 at least 0.8x the speed at
token 256. The KV cache is preallocated at --ctx (its pages become resident as they are first
written, so part of the growth is the cache filling: its bytes are printed beside it).

Then the same two depths again, measured alternately (the answer's first tokens prefilled to each
depth, 64 tokens decoded and timed, four rounds, medians), since a shared machine's speed drifts by
tens of percent over the minutes one generation takes.

Usage: python bench/long_decode.py [--tokens 4096] [--threads 2] [--rounds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2quant import minik2  # noqa: E402
from k2quant.convert import convert  # noqa: E402
from k2quant.recipe import build_recipe  # noqa: E402
from k2quant.runner.engine import Sampling  # noqa: E402
from k2quant.runner.runner import Runner, RunOptions  # noqa: E402

MARKS = (256, 1024, 2048, 4096)
WINDOW = 128


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def interleaved(r: Runner, seq: list[int], short: int, long: int, rounds: int = 4) -> dict:
    """Decode speed at two depths measured alternately: the same answer's first `short` and first `long`
    tokens prefilled (prefix reuse keeps the shared part), then WINDOW // 2 tokens decoded and timed;
    `rounds` times each, the medians. On a shared machine whose speed drifts by tens of percent over a
    minute, the one-generation figure above also measures the drift; alternating cancels most of it."""
    per = {short: [], long: []}
    for _ in range(rounds):
        for depth in (short, long):
            gen = r.generate(seq[:depth], Sampling(temperature=0.8, seed=0, max_tokens=WINDOW // 2 + 8))
            for _ in range(8):  # the prefill and the first steps
                next(gen)
            t0 = time.perf_counter()
            for _ in range(WINDOW // 2):
                next(gen)
            per[depth].append((time.perf_counter() - t0) / (WINDOW // 2))
            for _ in gen:
                pass
    return {"short": (short, statistics.median(per[short])), "long": (long, statistics.median(per[long])),
            "seconds_per_token": {str(k): v for k, v in per.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds at the two depths (0: none)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    marks = [m for m in MARKS if m <= a.tokens] or [a.tokens]
    info = minik2.build(minik2.default_dir(), print)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k2-int4"
        convert(info["fp8"], out, build_recipe("k2-int4"), method="rtn", progress=False)
        ctx = a.tokens + 256
        r = Runner(out, RunOptions(device="cpu", ctx=ctx, threads=a.threads, ram_bandwidth=1e10), progress=False)
        prompt = r.tokenizer.encode("Write a long story about a lighthouse keeper and the sea. " * 5)[:64]
        times, rss_at, ids = [], {}, []
        try:
            t0 = time.perf_counter()
            for i, tok in enumerate(r.generate(prompt, Sampling(temperature=0.8, seed=0, max_tokens=a.tokens)), 1):
                times.append(time.perf_counter() - t0)
                ids.append(tok)
                if i in marks:
                    rss_at[i] = rss()
            st = r.stats
            kv = r.engine.cache_bytes()
            deep = len(prompt) + marks[-1] - WINDOW
            inter = interleaved(r, prompt + ids, marks[0], deep, a.rounds) if a.rounds else None
        finally:
            r.close()
    if len(times) < marks[-1]:
        sys.exit(f"the answer ended after {len(times)} tokens ({st.finish_reason}), before token {marks[-1]}")

    def speed(end: int) -> float:
        start = max(1, end - WINDOW)
        return (end - start) / (times[end - 1] - times[start - 1])

    first, last = marks[0], marks[-1]
    growth = rss_at[last] - rss_at[first]
    ratio = speed(last) / speed(first)
    print(f"\nmini-K2 k2-int4, CPU {a.threads} threads, ctx {ctx}: {len(times)} tokens decoded "
          f"(finish_reason {st.finish_reason}), KV cache {kv / 2**20:.1f} MiB preallocated")  # fmt: skip
    print(f"{'token':>7}{'RSS MiB':>10}{'tokens/s (last 128)':>22}")
    for m in marks:
        print(f"{m:>7}{rss_at[m] / 2**20:>10.1f}{speed(m):>22.1f}")
    print(f"RSS growth after token {first}: {growth / 2**20:.1f} MiB "
          f"({'met' if growth < 50e6 else 'NOT met'}: under 50 MB)")  # fmt: skip
    print(f"speed at token {last} / at token {first}: {ratio:.2f} ({'met' if ratio >= 0.8 else 'NOT met'}: >= 0.8)")
    if inter:
        (d0, t_short), (d1, t_long) = inter["short"], inter["long"]
        print(f"interleaved ({a.rounds} rounds of {WINDOW // 2} tokens decoded after prefilling the answer to depth "
              f"{d0}, then to depth {d1}; medians): {1 / t_short:.1f} vs {1 / t_long:.1f} tokens/s, ratio "
              f"{t_short / t_long:.2f} ({'met' if t_short / t_long >= 0.8 else 'NOT met'}: >= 0.8)")  # fmt: skip
    if a.json:
        res = {"tokens": len(times), "ctx": ctx, "rss": rss_at, "growth": growth,
               "speed": {m: speed(m) for m in marks}, "ratio": ratio, "interleaved": inter}  # fmt: skip
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
