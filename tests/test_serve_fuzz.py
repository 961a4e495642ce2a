"""k2quant serve under hostile clients: mutated and random requests, lying headers, huge bodies, slow clients.

A live server (uvicorn on localhost) with mini-K2 behind the runner gets requests written byte by byte
on a raw socket, so nothing in a client library tidies them: valid chat and completion bodies mutated
by the readers' fuzzer (tests/fuzzing.py: JSON values replaced, deleted, added; bytes flipped, cut,
inserted), random JSON documents and bytes, other paths and methods, a Host that is not loopback,
Content-Length missing, lying or junk, chunked bodies, odd content types, bodies over --max-body. Every
answer must be a 2xx, a 4xx or a 503, with an OpenAI error object for each error (except uvicorn's own
plain-text 400 for a request its HTTP parser refuses before any app code runs) and no traceback in
any byte; a stream's events must be JSON or [DONE]. The fuzz run may find no 500 and nothing in the
server's error log, and the server must answer afterwards. Slow clients (headers or bodies sent a
byte at a time, or never finished) may not stop others from being served.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import socket
import time

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2quant.formats.chat import ChatTemplate
from k2quant.runner.runner import Runner, RunOptions
from k2quant.runner.server import ServeOptions, create_app, running

from . import fuzzing

NAME = "mini-k2"
MAX_BODY = 64 << 10
CASES = int(os.environ.get("K2QUANT_SERVE_FUZZ_CASES", "200"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
CALLED = [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": None, "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
           "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
          {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "{\"temp\": 21}"}]  # fmt: skip
BASES = {
    "/v1/chat/completions": [
        {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        {"model": NAME, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}],
         "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": 3, "stop": ["\n", "."],
         "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 3},
        {"model": NAME, "messages": CALLED, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 3,
         "parallel_tool_calls": False},
        {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]}],
         "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "stream": True,
         "max_tokens": 3, "chat_template_kwargs": {"thinking": True}},
    ],
    "/v1/completions": [
        {"model": NAME, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0},
        {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True, "echo": False, "seed": 7},
    ],
}  # fmt: skip
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/", "/v1/chat/completions/",
         "/v1/../health", "/v1/chat%2Fcompletions", "/%00", "/v1/models?x=" + "a" * 3000]  # fmt: skip
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=latin-1", None]  # fmt: skip
HOSTS = ["127.0.0.1", "localhost", "[::1]", "evil.example", "", "127.0.0.1:1", None]


class Capped:
    """The runner with every answer cut at 3 tokens (the server's own limit is what is under test; a
    mutated max_tokens may not make a case run to the end of the context)."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.tokenizer, self.ctx, self.default_temperature = runner.tokenizer, runner.ctx, runner.default_temperature

    def generate(self, prompt, sampling):
        limit = 3 if sampling.max_tokens is None else min(sampling.max_tokens, 3)
        return self.runner.generate(prompt, dataclasses.replace(sampling, max_tokens=limit))

    @property
    def stats(self):
        return self.runner.stats


class ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(self.format(record))


@pytest.fixture(scope="module")
def server(mini_k2):
    model = mini_k2["bf16"]
    runner = Runner(model, RunOptions(device="cpu", ctx=512, threads=2, ram_bandwidth=1e10), progress=False)
    errors = ErrorLog()
    loggers = [logging.getLogger(n) for n in ("k2quant.serve", "uvicorn.error")]
    for lg in loggers:
        lg.addHandler(errors)
    try:
        app = create_app(Capped(runner), ChatTemplate.load(model), ServeOptions(NAME, max_body=MAX_BODY))
        with running(app) as url:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            yield host, int(port), errors
    finally:
        for lg in loggers:
            lg.removeHandler(errors)
        runner.close()


@dataclasses.dataclass
class Answer:
    status: int | None  # None: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes
    cut: bool = False  # the server closed the connection before the client had sent everything


def exchange(addr, raw: bytes, half_close: bool = False, timeout: float = 60, method: str = "POST") -> Answer:
    """Send `raw` as it is on a new connection; read one HTTP response (chunked streams included)."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        cut = False
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # answered (and closed) before the body was read
            cut = True
        resp = http.client.HTTPResponse(sock, method=method)  # HEAD: headers only
        try:
            resp.begin()
            body = resp.read()
        except ConnectionResetError:  # the server closed with our bytes unread (it answered early): the kernel's
            return Answer(None, {}, b"", True)  # reset can drop that answer before it is read
        except (http.client.RemoteDisconnected, http.client.IncompleteRead):
            return Answer(None, {}, b"", cut)
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, cut)


def request_bytes(method: str, path: str, body: bytes, host: str | None, ctype: str | None, length: str,
                  extra: list[tuple[str, str]], version: str = "HTTP/1.1") -> tuple[bytes, bool]:  # fmt: skip
    """The request on the wire, and whether the client must half-close (its Content-Length promised more)."""
    head = [f"{method} {path} {version}"]
    if host is not None:
        head.append(f"Host: {host}")
    if ctype is not None:
        head.append(f"Content-Type: {ctype}")
    half_close = False
    if length == "chunked":
        head.append("Transfer-Encoding: chunked")
        step = max(1, len(body) // 3)
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i : i + step] for i in range(0, len(body), step)))
        body += b"0\r\n\r\n"
    elif length == "exact":
        head.append(f"Content-Length: {len(body)}")
    elif length == "short":  # says less: the rest is a second, garbage request on the connection
        head.append(f"Content-Length: {len(body) // 2}")
    elif length == "long":  # says more than ever comes
        head.append(f"Content-Length: {len(body) + 100}")
        half_close = True
    elif length != "missing":
        head.append(f"Content-Length: {length}")
    head += [f"{k}: {v}" for k, v in extra]
    head.append("Connection: close")
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body, half_close


header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), min_size=1,
                      max_size=12)  # fmt: skip
cases = st.fixed_dictionaries({
    "path": fuzzing.weighted((6, st.sampled_from(list(BASES))), (1, st.sampled_from(PATHS))),
    "method": fuzzing.choice(POST=12, GET=1, PUT=1, DELETE=1, OPTIONS=1, HEAD=1),
    "body": fuzzing.weighted((3, st.tuples(st.just("mutated"), st.integers(0, 99), st.just([]))),  # valid
                             (8, st.tuples(st.just("mutated"), st.integers(0, 99), st.lists(fuzzing.OPS["json"],
                                                                                            min_size=1, max_size=3))),
                             (2, st.tuples(st.just("json"), fuzzing.json_values)),
                             (1, st.tuples(st.just("bytes"), st.binary(max_size=200))),
                             (1, st.tuples(st.just("huge"), st.integers(MAX_BODY - 10, MAX_BODY + 10)))),
    "host": fuzzing.weighted((12, st.just("127.0.0.1")), (1, st.sampled_from(HOSTS))),
    "ctype": fuzzing.weighted((8, st.just("application/json")), (1, st.sampled_from(CONTENT_TYPES))),
    "length": fuzzing.weighted((10, st.just("exact")), (1, st.sampled_from(["chunked", "short", "long", "missing", "-1",
                                                                            "abc", "99999999999999999999", "1, 2"]))),
    "extra": st.lists(st.tuples(header_text, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                                                     max_size=40)), max_size=2),
    "version": fuzzing.weighted((12, st.just("HTTP/1.1")),
                                (1, st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x"]))),
})  # fmt: skip


def make_body(path: str, spec) -> bytes:
    kind = spec[0]
    if kind == "mutated":
        bases = BASES.get(path) or BASES["/v1/chat/completions"]
        data = json.dumps(bases[spec[1] % len(bases)], ensure_ascii=False).encode()
        for op in spec[2]:
            data = fuzzing.apply_op(op, data)
        return data
    if kind == "json":
        return json.dumps(spec[1], allow_nan=True).encode()
    if kind == "bytes":
        return spec[1]
    doc = json.dumps({"model": NAME, "prompt": "x"}).encode()
    return doc[:-1] + b', "pad": "' + b"y" * max(0, spec[1] - len(doc) - 10) + b'"}'


def check_answer(a: Answer, what: str, method: str = "POST") -> None:
    assert a.status is not None, f"no answer: {what}"
    assert a.status < 500 or a.status == 503, f"{a.status}: {a.body[:400]!r}\n  {what}"
    markers = (b"Traceback", b'File "', b"Error(", b"site-packages") if a.status >= 300 else (b"Traceback",)
    for marker in markers:  # an answer's sampled text is the model's: only an error's body is held to all of them
        assert marker not in a.body, f"{marker!r} in the answer: {a.body[:400]!r}\n  {what}"
    if a.status >= 400 and not a.body and method == "HEAD":  # a HEAD answer has headers only
        return
    if a.status >= 400:
        if a.status == 400 and a.body == b"Invalid HTTP request received.":  # uvicorn's HTTP parser (h11)
            return  # refused a malformed request line or header before any app code: plain text, by design
        err = json.loads(a.body)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), a.body
    elif a.headers.get("content-type", "").startswith("text/event-stream"):
        for line in a.body.decode("utf-8").splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    assert event["error"]["message"], line


def alive(addr) -> None:
    a = exchange(addr, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=30)
    assert a.status == 200 and json.loads(a.body) == {"status": "ok"}, a


def test_mutated_requests_get_a_4xx_or_an_answer_never_a_500(server):
    host, port, errors = server
    addr = (host, port)
    seen: dict[int | None, int] = {}

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(cases)
    def run(c):
        body = make_body(c["path"], c["body"])
        raw, half = request_bytes(c["method"], c["path"], body, c["host"], c["ctype"], c["length"], c["extra"],
                                  c["version"])  # fmt: skip
        what = f"{raw[:300]!r}{'...' if len(raw) > 300 else ''}"
        a = exchange(addr, raw, half, method=c["method"])
        seen[a.status] = seen.get(a.status, 0) + 1
        if a.status is None:  # only a client that promised more body and went away, or one that the server
            assert half or a.cut, f"no answer: {what}"  # stopped reading (its answer lost in the reset), gets none
        else:
            check_answer(a, what, c["method"])
        assert not errors.records, f"the server logged an error: {errors.records[-1][:800]}\n  {what}"

    run()
    alive(addr)
    print("statuses:", dict(sorted(seen.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))))
    assert sum(seen.values()) >= CASES
    assert seen.get(200, 0) >= CASES // 10, seen  # the mutations leave many requests valid: generation is reached
    assert sum(n for s, n in seen.items() if s and 400 <= s < 500) >= CASES // 4, seen


def test_huge_bodies_are_refused_without_reading_them_whole(server):
    host, port, errors = server
    for declared, sent in ((MAX_BODY + 1, 1000), (10**12, 10), (None, MAX_BODY * 4)):
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        body = b"[" * sent
        if declared is None:  # chunked: no length to refuse up front; the limit is counted as it arrives
            chunks = b"".join(b"%x\r\n%s\r\n" % (8192, body[i : i + 8192]) for i in range(0, len(body), 8192))
            raw = (head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
        else:
            raw = (head + f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode() + body
        a = exchange((host, port), raw, half_close=declared is not None)
        assert a.status == 413 and json.loads(a.body)["error"]["code"] == "body_too_large", (declared, a)
    alive((host, port))
    assert not errors.records


def test_slow_clients_do_not_stop_others(server):
    """40 connections that never finish their headers and 10 that send a body a byte at a time stay open
    while the openai client gets its answers; then the slow bodies finish and are answered too."""
    host, port, errors = server
    stalled = []
    for _ in range(40):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        stalled.append(s)
    body = json.dumps(BASES["/v1/completions"][0]).encode()
    slow = []
    for _ in range(10):
        s = socket.create_connection((host, port), timeout=60)
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
        slow.append(s)
    try:
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        for i in range(3):
            for s in slow:  # a few bytes of every slow body between the fast requests
                s.sendall(body[i * 5 : i * 5 + 5])
            t = time.monotonic()
            r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            assert r.choices[0].message.content is not None and time.monotonic() - t < 30
        for s in slow:
            s.sendall(body[15:])
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status == 200 and json.loads(resp.read())["object"] == "text_completion"
    finally:
        for s in stalled + slow:
            s.close()
    alive((host, port))
    assert not errors.records
