"""k2quant serve as clients use it: the official `openai` package against a live server on localhost.

mini-K2 behind the runner for generation (answers checked against the model's naive greedy
generate, usage against the tokens actually processed, seeds, prefix reuse); a scripted model
behind the same Backend interface (as nanochat tests its engine) where the test must decide
what the model says: tool calls, reasoning, slow answers for disconnects and the queue.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

try:  # the HTTP client the installed openai package is built on
    import httpx2 as httpx
except ImportError:  # openai < 3
    import httpx

from k2quant.formats.chat import ChatTemplate
from k2quant.formats.tokenizer import load_tokenizer
from k2quant.model import generate as naive_generate
from k2quant.model import open_model
from k2quant.runner.engine import Sampling, Stats
from k2quant.runner.runner import Runner, RunOptions
from k2quant.runner.server import ServeOptions, create_app, running

NAME = "mini-k2"
CALL = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris", "unit": "celsius"}<|tool_call_end|><|tool_calls_section_end|>'
)
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
           "required": ["city"]}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]  # fmt: skip


class Scripted:
    """A Backend whose answers are given: each generate() yields the next script's token ids."""

    def __init__(self, tok, scripts, ctx: int = 2048, delay: float = 0.0):
        self.tokenizer, self.ctx, self.default_temperature = tok, ctx, 0.6
        self.scripts, self.delay = list(scripts), delay
        self.prompts: list[list[int]] = []
        self.yielded: list[int] = []  # tokens yielded per generation
        self.stats = Stats()
        self.lock = threading.Lock()

    def generate(self, prompt, sampling: Sampling):
        with self.lock:
            self.prompts.append(list(prompt))
            text = self.scripts[(len(self.prompts) - 1) % len(self.scripts)]
        ids = self.tokenizer.encode(text, allow_special=True)
        st = self.stats = Stats(prompt_tokens=len(prompt))
        self.yielded.append(0)
        for i, t in enumerate(ids):
            if sampling.max_tokens is not None and i >= sampling.max_tokens:
                st.finish_reason = "length"
                return
            if self.delay:
                time.sleep(self.delay)
            yield t
            self.yielded[-1] += 1
            st.decode_tokens += 1
        st.finish_reason = "stop"


@pytest.fixture(scope="module")
def model_dir(mini_k2):
    return mini_k2["bf16"]


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def template(model_dir):
    return ChatTemplate.load(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir):
    r = Runner(model_dir, RunOptions(device="cpu", ctx=1024, threads=2, ram_bandwidth=1e10, prefix_cache=2),
               progress=False)  # fmt: skip
    yield r
    r.close()


@pytest.fixture(scope="module")
def live(runner, template):
    with running(create_app(runner, template, ServeOptions(NAME))) as url:
        yield url


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live + "/v1", api_key="unused", max_retries=0, timeout=120)


def scripted_server(tok, template, scripts, **kw):
    backend = Scripted(tok, scripts, delay=kw.pop("delay", 0.0))
    return backend, running(create_app(backend, template, ServeOptions(NAME, **kw)))


# ---------------------------------------------------------------------------- the real model
def test_chat_matches_naive_greedy_and_usage_counts_tokens(client, runner, tok, template):
    messages = [{"role": "user", "content": "Write one sentence about rivers."}]
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8)
    assert r.object == "chat.completion" and r.model == NAME
    ids = tok.encode(template.render(messages), allow_special=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(ids) + 8
    ref = naive_generate(open_model(runner.path), ids, 8)
    ref = ref[len(ids) :] if len(ref) > 8 else ref
    assert r.choices[0].message.content == tok.decode(ref)


def test_stream_chinese_equals_non_streaming(client):
    messages = [{"role": "user", "content": "请用一句话介绍长江。"}]
    full = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the second request extended nothing but repeated the first: its prompt came from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens - 1


def test_completions_models_and_seed(client):
    r = client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="def fibonacci(n):", max_tokens=6, temperature=0, stream=True) if c.choices)  # fmt: skip
    assert streamed == r.choices[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = client.chat.completions.create(model=NAME, messages=msgs, temperature=1.0, seed=7, max_tokens=10)
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Other."}], max_tokens=3)
    b = client.chat.completions.create(model=NAME, messages=msgs, temperature=1.0, seed=7, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_prefix_reuse_across_turns(client, tok, template):
    msgs = [{"role": "user", "content": "Name a color."}]
    a = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=5)
    msgs += [{"role": "assistant", "content": a.choices[0].message.content}, {"role": "user", "content": "Another."}]
    b = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=5)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert b.usage.prompt_tokens == len(tok.encode(template.render(msgs), allow_special=True))
    assert a.usage.prompt_tokens - 1 <= cached < b.usage.prompt_tokens


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, 400,
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
         400, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
          "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "context"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "gpt-4"),
    ],
)  # fmt: skip
def test_bad_requests_are_named(live, body, status, needle):
    r = httpx.post(live + "/v1/chat/completions", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] + str(err.get("param")), err
    assert "Traceback" not in r.text
    assert httpx.get(live + "/health").status_code == 200


def test_malformed_json_body_size_and_unknown_route(live):
    r = httpx.post(live + "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(
        live + "/v1/chat/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]
    r = httpx.get(live + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # standard fields at their default values and unknown fields are accepted
    ok = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 1,
          "presence_penalty": 0,
          "frequency_penalty": 0, "logprobs": False, "user": "u", "store": False, "metadata": {}, "top_k": 5,
          "min_p": 0.05, "parallel_tool_calls": True, "response_format": {"type": "text"},
          "x_vendor_field": 1}  # fmt: skip
    r = httpx.post(live + "/v1/chat/completions", json=ok, timeout=60)
    assert r.status_code == 200, r.text


def test_api_key(tok, template):
    _, srv = scripted_server(tok, template, ["ok"], api_key="sekret")
    with srv as url:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}]).choices


# ---------------------------------------------------------------------------- tool calls, reasoning
def test_tool_call_round_trip(tok, template):
    backend, srv = scripted_server(tok, template, ["Let me check." + CALL, "It is 18 degrees in Paris."])
    with srv as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
        r = c.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and m.content == "Let me check."
        assert [(t.id, t.type, t.function.name) for t in m.tool_calls] == [("functions.get_weather:0", "function",
                                                                              "get_weather")]  # fmt: skip
        assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
        msgs += [m.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": m.tool_calls[0].id,
                                                  "content": '{"temp": 18}'}]  # fmt: skip
        r2 = c.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS)
        assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.tool_calls is None
    # the second prompt is the round trip as transformers' own renderer renders the same template
    from transformers.utils.chat_template_utils import render_jinja_template

    sent = [dict(msgs[0]), {"role": "assistant", "content": "Let me check.",
                            "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                            "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            msgs[2]]  # fmt: skip
    rendered, _ = render_jinja_template(conversations=[sent], tools=TOOLS, chat_template=template.source,
                                        add_generation_prompt=True)  # fmt: skip
    assert tok.decode(backend.prompts[1]) == rendered[0]


def test_tool_call_stream_read_by_the_client(tok, template):
    two = CALL.replace(
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>functions.get_time:1"
        '<|tool_call_argument_begin|>{"tz": "Europe/Paris"}<|tool_call_end|><|tool_calls_section_end|>',
    )
    _, srv = scripted_server(tok, template, ["Checking." + two])
    with srv as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w?"}],
                                                tools=TOOLS, stream=True))  # fmt: skip
    calls: dict[int, dict] = {}
    content = ""
    for ch in chunks:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
            if tc.id:
                assert slot["id"] is None and tc.type == "function" and tc.function.name
                slot["id"], slot["name"] = tc.id, tc.function.name
            else:
                assert slot["id"] is not None  # the first delta of a call carries id and name
            slot["args"] += tc.function.arguments or ""
    assert content == "Checking."
    assert calls[0]["id"] == "functions.get_weather:0"
    assert calls[1] == {"id": "functions.get_time:1", "name": "get_time",
                                                                         "args": '{"tz": "Europe/Paris"}'}  # fmt: skip
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_reasoning_tool_choice_and_bad_json(tok, template):
    scripts = ["<think>The user wants weather.</think>Sure.",
               '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|>',
               "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
               "{city: Oslo}<|tool_call_end|><|tool_calls_section_end|>"]  # fmt: skip
    backend, srv = scripted_server(tok, template, scripts)
    with srv as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "weather?"}]
        r = c.chat.completions.create(model=NAME, messages=msgs)
        assert r.choices[0].message.content == "Sure."
        assert r.choices[0].message.reasoning_content == "The user wants weather."
        r = c.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS,
                                      tool_choice={"type": "function",
                                                   "function": {"name": "get_weather"}})  # fmt: skip
        assert tok.decode(backend.prompts[-1]).endswith("<|tool_call_begin|>functions.get_weather:0"
                                                        "<|tool_call_argument_begin|>")  # fmt: skip
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Oslo"}'
        r = c.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS)  # invalid JSON: plain content
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
        assert "{city: Oslo}" in r.choices[0].message.content


# ---------------------------------------------------------------------------- queue, disconnects, load
def test_disconnect_stops_generation_and_next_starts(tok, template):
    backend, srv = scripted_server(tok, template, ["word " * 400, "short answer"], delay=0.02)
    with srv as url:
        body = {"model": NAME, "messages": [{"role": "user", "content": "go"}], "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/chat/completions", json=body) as s:
            lines = s.iter_lines()
            for _ in range(6):
                next(lines)
        t0 = time.monotonic()  # the stream is closed: its generation must stop now, not in 8 s
        r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "short answer"
        assert time.monotonic() - t0 < 4
    assert backend.yielded[0] < 200  # 400 tokens at 20 ms each were scripted


def test_queue_full_is_503_with_retry_after(tok, template):
    backend, srv = scripted_server(tok, template, ["a " * 100], delay=0.02, max_queue=1)
    with srv as url:
        body = {"model": NAME, "messages": [{"role": "user", "content": "go"}]}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            while not backend.prompts:  # the first is running
                time.sleep(0.01)
            second = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            time.sleep(0.3)  # the second is waiting
            third = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert third.status_code == 503 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["code"] == "queue_full"
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_load_16_clients(tok, template):
    import psutil

    scripts = ["Answer number one, plain.", "Checking." + CALL, "<think>hmm</think>Fine, 好的。"]
    _, srv = scripted_server(tok, template, scripts)
    proc = psutil.Process()
    with srv as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def one(i: int):
            kw = dict(model=NAME, messages=[{"role": "user", "content": f"q{i}"}], tools=TOOLS)
            if i % 2:
                chunks = list(c.chat.completions.create(**kw, stream=True))
                assert chunks[-1].choices[0].finish_reason in ("stop", "tool_calls")
                return "stream"
            r = c.chat.completions.create(**kw)
            assert r.choices[0].finish_reason in ("stop", "tool_calls") and r.usage.completion_tokens > 0
            return "plain"

        one(0)
        rss0 = proc.memory_info().rss
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(64)))
        grown = proc.memory_info().rss - rss0
    assert len(results) == 64 and results.count("stream") == 32
    assert grown < 50 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 64 requests"


def test_model_name_and_torch_untouched_by_requests(live):
    # nothing in a request reaches the file system: a model name that looks like a path is just a wrong name
    r = httpx.post(live + "/v1/chat/completions", json={"model": "../../etc/passwd",
                                                        "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    assert r.status_code == 404
    assert torch.get_num_threads() >= 1


def test_prefix_reuse_stops_where_the_template_drops_old_reasoning(client, tok, template):
    """mini-K2's template, like K2-Thinking's, renders reasoning only after the last user message: a new user
    turn rewrites the earlier assistant turn, and reuse keeps exactly the tokens before that change."""
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    first = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [call]},
             {"role": "tool", "tool_call_id": call["id"], "content": "4 degrees"}]  # fmt: skip
    a = client.chat.completions.create(model=NAME, messages=first, tools=TOOLS, temperature=0, max_tokens=3)
    second = first + [{"role": "assistant", "content": "It is 4 degrees."}, {"role": "user", "content": "And Bergen?"}]
    b = client.chat.completions.create(model=NAME, messages=second, tools=TOOLS, temperature=0, max_tokens=3)
    ids1 = tok.encode(template.render(first, tools=TOOLS), allow_special=True)
    ids2 = tok.encode(template.render(second, tools=TOOLS), allow_special=True)
    assert "I should call the tool." in template.render(first, tools=TOOLS)
    assert "I should call the tool." not in template.render(second, tools=TOOLS)
    keep = next(i for i, (x, y) in enumerate(zip(ids1, ids2, strict=False)) if x != y)
    assert a.usage.prompt_tokens == len(ids1) and b.usage.prompt_tokens == len(ids2)
    assert b.usage.prompt_tokens_details.cached_tokens == keep < len(ids1)


def test_non_streaming_disconnect_cancels(tok, template):
    import socket

    backend, srv = scripted_server(tok, template, ["word " * 400, "short answer"], delay=0.02)
    with srv as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "go"}]}).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        while not backend.yielded or backend.yielded[0] < 3:
            time.sleep(0.01)
        s.close()
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=json.loads(body), timeout=30)
        assert r.json()["choices"][0]["message"]["content"] == "short answer"
        assert time.monotonic() - t0 < 4
    assert backend.yielded[0] < 200


def test_review_cases(tok, template):
    """max_queue 0 still runs one request; nulls for optional fields; reserved template kwargs, seeds out of
    range and foreign Host headers refused; parallel_tool_calls false keeps one call; a cut answer is length."""
    two = CALL.replace(
        "<|tool_calls_section_end|>",
        "<|tool_call_begin|>functions.get_weather:1"
        '<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>',
    )
    _, srv = scripted_server(tok, template, [two], max_queue=0)
    with srv as url:
        base = {"model": NAME, "messages": [{"role": "user", "content": "w?"}], "tools": TOOLS}
        post = lambda **kw: httpx.post(url + "/v1/chat/completions", json={**base, **kw}, timeout=30)  # noqa: E731
        r = post(n=None, stream=None, presence_penalty=None, frequency_penalty=None)
        assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["tool_calls"]) == 2
        r = post(parallel_tool_calls=False)
        assert [c["id"] for c in r.json()["choices"][0]["message"]["tool_calls"]] == ["functions.get_weather:0"]
        stream = httpx.post(url + "/v1/chat/completions", json={**base, "stream": True, "parallel_tool_calls": False})
        assert "functions.get_weather:1" not in stream.text and "functions.get_weather:0" in stream.text
        assert stream.headers["cache-control"] == "no-cache"
        r = post(max_tokens=len(tok.encode(two, allow_special=True)) - 1)
        assert r.json()["choices"][0]["finish_reason"] == "length"
        r = post(chat_template_kwargs={"add_generation_prompt": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
        r = post(seed=2**70)
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
        r = httpx.get(url + "/v1/models", headers={"host": "evil.example:80"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"


def test_two_conversations_keep_their_caches(client):
    """Two conversations that share the default system prompt alternate: each continues its own cache
    (the server's runner keeps 2), instead of one truncating the other to the shared prefix."""
    a = [{"role": "user", "content": "Tell me about copper."}]
    b = [{"role": "user", "content": "Tell me about rivers."}]
    ra = client.chat.completions.create(model=NAME, messages=a, temperature=0, max_tokens=4)
    rb = client.chat.completions.create(model=NAME, messages=b, temperature=0, max_tokens=4)
    assert 0 < rb.usage.prompt_tokens_details.cached_tokens < rb.usage.prompt_tokens - 1  # the shared prefix, copied
    for msgs, first in ((a, ra), (b, rb)):
        msgs += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "More."},
        ]
        r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=4)
        assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_an_answer_that_reaches_the_context_ends_with_length(model_dir, template):
    """No max_tokens, no stop token sampled: the answer runs to the end of --ctx and ends cleanly, as
    finish_reason "length", streamed and not; the cache is full and the next request is served."""
    r = Runner(model_dir, RunOptions(device="cpu", ctx=48, threads=2, ram_bandwidth=1e10), progress=False)
    try:
        with running(create_app(r, template, ServeOptions(NAME))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            messages = [{"role": "user", "content": "Tell a story."}]
            prompt = len(r.tokenizer.encode(template.render(messages), allow_special=True))
            # greedy mini-K2 does not end these turns within 48 tokens (had it, finish_reason would say "stop")
            a = client.chat.completions.create(model=NAME, messages=messages, temperature=0, seed=1)
            assert a.choices[0].finish_reason == "length", a
            assert a.usage.prompt_tokens == prompt and prompt + a.usage.completion_tokens == 48
            chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
            c = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0)
            assert c.choices[0].finish_reason == "length"
    finally:
        r.close()
