"""Benchmark: what HTTP costs `k2quant serve`, and what prefix reuse saves an agent.

On the synthetic K2-dimension model of bench/run.py (so a token costs what it costs at K2's
dimensions; run bench/run.py once to build it), one process, one Runner:

  * in-process: the runner's own generator, time to first token (prefill + first sample)
    and decode tokens/s of `--tokens` greedy tokens after a fresh prompt;
  * through HTTP: the same through `k2quant serve`'s app on localhost, read by the official
    `openai` client as a stream (first content chunk, then tokens/s between the first and the
    last chunk); the ratio of the two is what HTTP costs (acceptance: under 5% of decode speed);
  * an agent's 5-turn tool-using conversation (each turn an assistant tool call and its
    result appended, the whole history resent): time to first token of turn 5 when the server
    holds turn 4's KV cache (prefix reuse) and after the cache was taken by another
    conversation (`--prefix-cache 1`), with the cached tokens reported by `usage`.

Each measurement uses a new random prompt so no run is helped by an earlier one unless meant.

Usage: python bench/serve.py [--model /tmp/k2bench-run/k2quant-int4] [--threads 2] [--tokens 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import openai

from k2quant.formats.chat import ChatTemplate
from k2quant.runner.engine import Sampling
from k2quant.runner.runner import Runner, RunOptions
from k2quant.runner.server import ServeOptions, create_app, running

WORDS = "river stone market lantern copper harbor signal orchard ledger window basin thread".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def in_process(r: Runner, ids: list[int], n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    times = []
    for _ in r.generate(ids, Sampling(temperature=0, max_tokens=n, stop_ids=())):
        times.append(time.perf_counter())
    return times[0] - t0, (len(times) - 1) / (times[-1] - times[0])


def over_http(c: openai.OpenAI, name: str, messages: list[dict], n: int, tools=None) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    times, usage = [], None
    kw = {"tools": tools} if tools else {}
    stream = c.chat.completions.create(model=name, messages=messages, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, **kw)  # fmt: skip
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        if ch.choices and (ch.choices[0].delta.content or ch.choices[0].delta.tool_calls):
            times.append(time.perf_counter())
    tps = (usage.completion_tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] - t0, tps, usage.model_dump()


TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the notes",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]  # fmt: skip


def conversation(rng: random.Random, turns: int) -> list[list[dict]]:
    """The message lists an agent sends on turns 1..turns (each the previous plus a call and its result)."""
    msgs = [{"role": "system", "content": "You are a research agent. " + sentence(rng, 20)},
            {"role": "user", "content": "Find what the notes say about " + sentence(rng, 12)}]  # fmt: skip
    out = [list(msgs)]
    for t in range(turns - 1):
        cid = f"functions.search:{t}"
        msgs += [{"role": "assistant", "content": "", "tool_calls": [{"id": cid, "type": "function", "function": {
                     "name": "search", "arguments": json.dumps({"query": sentence(rng, 4)})}}]},
                 {"role": "tool", "tool_call_id": cid, "content": sentence(rng, 40)}]  # fmt: skip
        out.append(list(msgs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/k2bench-run/k2quant-int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    if not Path(a.model, "config.json").exists():
        sys.exit(f"{a.model}: not found; run bench/run.py first (it builds the synthetic K2-dimension model)")
    rng = random.Random(0)
    r = Runner(a.model, RunOptions(device="cpu", threads=a.threads, ctx=2048, prefix_cache=1), progress=False)
    template = ChatTemplate.load(a.model)
    tok = r.tokenizer
    res: dict = {"model": a.model, "threads": a.threads, "tokens": a.tokens}

    def fresh() -> list[dict]:
        return [{"role": "user", "content": sentence(rng, 24)}]

    ttft, tps = in_process(r, tok.encode(template.render(fresh()), allow_special=True), a.tokens)
    res["in_process"] = {"ttft_s": ttft, "decode_tps": tps}
    print(f"in-process:  time to first token {ttft:6.2f} s, decode {tps:.3f} tokens/s", flush=True)
    with running(create_app(r, template, ServeOptions("bench"))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
        h_ttft, h_tps, _ = over_http(c, "bench", fresh(), a.tokens)
        res["http"] = {"ttft_s": h_ttft, "decode_tps": h_tps}
        res["http_decode_cost"] = 1 - h_tps / tps
        print(f"over HTTP:   time to first token {h_ttft:6.2f} s, decode {h_tps:.3f} tokens/s "
              f"({100 * (1 - h_tps / tps):+.1f}% slower decode than in-process; acceptance < 5%)",
              flush=True)  # fmt: skip
        turns = conversation(rng, 5)
        for msgs in turns[:-1]:  # turns 1..4, each reusing the one before
            over_http(c, "bench", msgs, 2, TOOLS)
        warm = over_http(c, "bench", turns[-1], 2, TOOLS)
        over_http(c, "bench", fresh(), 2)  # another conversation takes the one cache
        cold = over_http(c, "bench", turns[-1], 2, TOOLS)
    p = warm[2]["prompt_tokens"]
    cached = [x[2]["prompt_tokens_details"]["cached_tokens"] for x in (warm, cold)]
    res["turn5"] = {"prompt_tokens": p, "with_reuse": {"ttft_s": warm[0], "cached_tokens": cached[0]},
                    "without_reuse": {"ttft_s": cold[0], "cached_tokens": cached[1]}}  # fmt: skip
    print(f"turn 5 of a tool-using conversation ({p} prompt tokens): time to first token {warm[0]:.2f} s with "
          f"prefix reuse ({res['turn5']['with_reuse']['cached_tokens']} cached), {cold[0]:.2f} s without "
          f"({res['turn5']['without_reuse']['cached_tokens']} cached): {cold[0] / warm[0]:.1f}x")  # fmt: skip
    r.close()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
