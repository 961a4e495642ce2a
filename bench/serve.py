"""Benchmark: what HTTP costs `k2quant serve`, and what prefix reuse saves an agent.

On the synthetic K2-dimension model of bench/run.py (so a token costs what it costs at K2's
dimensions; run bench/run.py once to build it), one process, one Runner:

  * in-process: the runner's own generator, time to first token (prefill + first sample)
    and decode tokens/s of `--tokens` greedy tokens after a fresh prompt;
  * through HTTP: the same through `k2quant serve`'s app on localhost, read by the official
    `openai` client in a separate process (as real clients are), as a stream (first content
    chunk, then tokens/s up to the finish chunk); the ratio of the two is what HTTP costs
    (acceptance: under 5% of decode speed);
  * an agent's 5-turn tool-using conversation (each turn an assistant tool call and its
    result appended, the whole history resent): time to first token of turn 5 when the server
    holds turn 4's KV cache (prefix reuse) and after the cache was taken by another
    conversation (`--prefix-cache 1`), with the cached tokens reported by `usage`.

Each measurement uses a new random prompt so no run is helped by an earlier one unless meant;
one warm-up generation runs first, then in-process and HTTP alternate `--rounds` times and the
best decode speed of each is compared (the machine is shared: the best is the least disturbed).

Usage: python bench/serve.py [--model /tmp/k2bench-run/k2quant-int4] [--threads 2] [--tokens 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import openai

from k2quant.formats.chat import ChatTemplate
from k2quant.runner.engine import Sampling, Stats
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


CLIENT = r"""
import json, sys, time, openai
url, name, n, messages = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from serve import over_http
c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
print(json.dumps(over_http(c, name, messages, n)))
"""


def over_http_elsewhere(url: str, name: str, messages: list[dict], n: int) -> tuple[float, float]:
    """over_http from a separate client process, as real clients are (no GIL shared with the server)."""
    out = subprocess.run([sys.executable, "-c", CLIENT, url, name, str(n), json.dumps(messages),
                          str(Path(__file__).parent)], capture_output=True, text=True, check=True)  # fmt: skip
    ttft, tps, _ = json.loads(out.stdout.splitlines()[-1])
    return ttft, tps


def over_http(c: openai.OpenAI, name: str, messages: list[dict], n: int, tools=None) -> tuple[float, float, dict]:
    """(time to the first chunk after the role chunk, decode tokens/s, usage) of one streamed answer.

    Decode speed counts the tokens the engine yielded (usage's completion tokens, less the stop token when
    it stopped on one) over the time from the first chunk to the finish chunk, which the server sends as
    soon as generation ends: the same span the in-process measurement times."""
    t0 = time.perf_counter()
    first = end = None
    usage, reason = None, None
    kw = {"tools": tools} if tools else {}
    stream = c.chat.completions.create(model=name, messages=messages, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, **kw)  # fmt: skip
    for ch in stream:
        now = time.perf_counter()
        if ch.usage is not None:
            usage = ch.usage
        if not ch.choices or ch.choices[0].delta.role:
            continue
        first = first or now
        if ch.choices[0].finish_reason:
            end, reason = now, ch.choices[0].finish_reason
    yielded = usage.completion_tokens - (reason == "stop")
    tps = (yielded - 1) / (end - first) if yielded > 1 and end > first else float("nan")
    return first - t0, tps, usage.model_dump()


TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the notes",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]  # fmt: skip


def conversation(rng: random.Random, turns: int) -> list[list[dict]]:
    """The message lists an agent sends on turns 1..turns (each the previous plus a call and its result)."""
    msgs = [{"role": "system", "content": "You are a research agent. " + sentence(rng, 4)},
            {"role": "user", "content": "Find what the notes say about " + sentence(rng, 4)}]  # fmt: skip
    out = [list(msgs)]
    for t in range(turns - 1):
        cid = f"functions.search:{t}"
        msgs += [{"role": "assistant", "content": "", "tool_calls": [{"id": cid, "type": "function", "function": {
                     "name": "search", "arguments": json.dumps({"query": sentence(rng, 2)})}}]},
                 {"role": "tool", "tool_call_id": cid, "content": sentence(rng, 10)}]  # fmt: skip
        out.append(list(msgs))
    return out


class Instant:
    """A backend that yields a fixed text's tokens at no cost: what is left is the server's own cost per token."""

    def __init__(self, tok, text: str):
        self.tokenizer, self.ctx, self.default_temperature = tok, 1 << 20, 0.0
        self.ids = tok.encode(text)
        self.stats = Stats()

    def generate(self, prompt, sampling):
        self.stats = Stats(prompt_tokens=len(prompt), finish_reason="length")
        for t in self.ids[: sampling.max_tokens]:
            yield t
            self.stats.decode_tokens += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/k2bench-run/k2quant-int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode-only", action="store_true", help="skip the 5-turn conversation")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    if not Path(a.model, "config.json").exists():
        sys.exit(f"{a.model}: not found; run bench/run.py first (it builds the synthetic K2-dimension model)")
    rng = random.Random(0)
    r = Runner(a.model, RunOptions(device="cpu", threads=a.threads, ctx=4096, prefix_cache=1), progress=False)
    template = ChatTemplate.load(a.model)
    tok = r.tokenizer
    res: dict = {"model": a.model, "threads": a.threads, "tokens": a.tokens}

    def fresh() -> list[dict]:
        return [{"role": "user", "content": sentence(rng, 8)}]

    def local() -> tuple[float, float]:
        return in_process(r, tok.encode(template.render(fresh()), allow_special=True), a.tokens)

    in_process(r, tok.encode(template.render(fresh()), allow_special=True), 4)  # warm-up
    with running(create_app(r, template, ServeOptions("bench"))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
        runs = {"in_process": [], "http": []}
        for i in range(a.rounds):
            runs["in_process"].append(local())
            runs["http"].append(over_http_elsewhere(url, "bench", fresh(), a.tokens))
            print(f"round {i + 1}: in-process {runs['in_process'][-1][1]:.3f} tokens/s, "
                  f"HTTP {runs['http'][-1][1]:.3f} tokens/s", flush=True)  # fmt: skip
        (ttft, tps), (h_ttft, h_tps) = (max(runs[k], key=lambda x: x[1]) for k in ("in_process", "http"))
        res["in_process"] = {"ttft_s": ttft, "decode_tps": tps, "runs": runs["in_process"]}
        res["http"] = {"ttft_s": h_ttft, "decode_tps": h_tps, "runs": runs["http"]}
        res["http_decode_cost"] = 1 - h_tps / tps
        print(f"in-process:  time to first token {ttft:6.2f} s, decode {tps:.3f} tokens/s", flush=True)
        print(f"over HTTP:   time to first token {h_ttft:6.2f} s, decode {h_tps:.3f} tokens/s "
              f"({100 * (1 - h_tps / tps):+.1f}% slower decode than in-process; acceptance < 5%)",
              flush=True)  # fmt: skip
        # the server's own cost per token: the same path with a model that costs nothing
        instant = Instant(tok, " ".join(WORDS * 200))
        with running(create_app(instant, template, ServeOptions("instant"))) as iurl:
            n = min(2000, len(instant.ids))
            _, itps = over_http_elsewhere(iurl, "instant", fresh(), n)
        res["server_tokens_per_s_at_no_model_cost"] = itps
        res["http_cost_share_of_a_decode_step"] = tps / itps
        print(f"server alone (a model that costs nothing): {itps:.0f} tokens/s through HTTP = "
              f"{1e3 / itps:.2f} ms per token, {100 * tps / itps:.2f}% of one decode step here",
              flush=True)  # fmt: skip
        if a.decode_only:
            r.close()
            if a.json_out:
                Path(a.json_out).write_text(json.dumps(res, indent=1))
            return
        turns = conversation(rng, 5)
        for msgs in turns[:-1]:  # turns 1..4, each reusing the one before
            over_http(c, "bench", msgs, 1, TOOLS)
        warm = over_http(c, "bench", turns[-1], 1, TOOLS)  # one token: the finish chunk comes after it
        over_http(c, "bench", fresh(), 1)  # another conversation takes the one cache
        cold = over_http(c, "bench", turns[-1], 1, TOOLS)
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
