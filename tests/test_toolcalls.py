"""k2quant.runner.toolcalls: K2 output split into content, reasoning and tool calls, at once and streamed.

Every case states its expected `Parsed` and is checked three ways: `parse` of the whole text, and the stream's
deltas (concatenated, arguments gathered by index) for every single split point, one character a push, and
random splits with a fixed seed. The collector also checks the delta order OpenAI clients rely on.
"""

import random

import pytest

from k2quant.runner import toolcalls
from k2quant.runner.toolcalls import SECTION_BEGIN, Delta, OutputStream, Parsed, ToolCall, ToolCallDelta, parse

S, SE = toolcalls.SECTION_BEGIN, toolcalls.SECTION_END
C, A, CE = toolcalls.CALL_BEGIN, toolcalls.ARGUMENT_BEGIN, toolcalls.CALL_END
WEATHER = '{"city": "Paris"}'
ONE_CALL = f"{S}{C}functions.get_weather:0{A}{WEATHER}{CE}{SE}"


def collect(deltas: list[Delta]) -> Parsed:
    """Concatenate deltas as a client does, checking each carries one field and the id/name-then-arguments order."""
    content, reasoning, calls = [], [], []
    for d in deltas:
        assert (d.content is not None) + (d.reasoning is not None) + (d.tool_call is not None) == 1
        if d.content is not None:
            assert d.content
            content.append(d.content)
        elif d.reasoning is not None:
            assert d.reasoning
            reasoning.append(d.reasoning)
        else:
            tc = d.tool_call
            if tc.index == len(calls):  # a new call: id and name first, no arguments yet
                assert tc.id and tc.name and tc.arguments == ""
                calls.append(ToolCall(tc.id, tc.name, ""))
            else:  # then argument fragments of the same call
                assert tc.index == len(calls) - 1 and tc.id is None and tc.name is None and tc.arguments
                calls[-1].arguments += tc.arguments
    return Parsed("".join(content), "".join(reasoning), calls)


def stream(text: str, cuts: list[int], **kw) -> tuple[list[Delta], OutputStream]:
    s = OutputStream(**kw)
    deltas, prev = [], 0
    for c in [*cuts, len(text)]:
        deltas += s.push(text[prev:c])
        prev = c
    deltas += s.finish()
    return deltas, s


def splits(text: str, seed: int = 0) -> list[list[int]]:
    n = len(text)
    out = [[i] for i in range(1, n)] + [list(range(1, n))]
    rng = random.Random(seed)
    for _ in range(30):
        out.append(sorted(rng.choices(range(n + 1), k=rng.randint(1, 12))))  # repeats give empty pushes
    return out


def check(text: str, expected: Parsed, **kw) -> None:
    assert parse(text, **kw) == expected
    for cuts in splits(text):
        deltas, s = stream(text, cuts, **kw)
        assert collect(deltas) == expected, cuts
        assert s.tool_calls_emitted == bool(expected.tool_calls)


# -- tool calls ------------------------------------------------------------------------------------------------


def test_one_call():
    check(ONE_CALL, Parsed("", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]))


def test_two_and_three_parallel_calls():
    two = f'{S}{C}functions.get_weather:0{A}{WEATHER}{CE}{C}functions.get_time:1{A}{{"tz": "CET"}}{CE}{SE}'
    calls = [
        ToolCall("functions.get_weather:0", "get_weather", WEATHER),
        ToolCall("functions.get_time:1", "get_time", '{"tz": "CET"}'),
    ]
    check(two, Parsed("", "", calls))
    three = two[: -len(SE)] + f"\n{C}functions.search:2{A}{{}}{CE}\n{SE}"
    check(three, Parsed("", "", [*calls, ToolCall("functions.search:2", "search", "{}")]))
    deltas, _ = stream(three, [])
    assert [d.tool_call.index for d in deltas] == [0, 0, 1, 1, 2, 2]


def test_whitespace_around_id_and_arguments_and_between_calls():
    text = f"{S}\n{C} functions.get_weather:0 \n{A}\n  {WEATHER} \n{CE}\n\n{SE}"
    check(text, Parsed("", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]))


def test_id_without_namespace_and_nested_arguments_kept_as_written():
    args = '{"q": {"a": [1, 2.5, null], "b": "x\\"y"}, "n": true}'
    text = f"{S}{C}lookup:7{A}{args}{CE}{SE}"
    check(text, Parsed("", "", [ToolCall("lookup:7", "lookup", args)]))


def test_arguments_split_at_every_boundary_come_in_the_pieces_pushed():
    args_at = ONE_CALL.index(WEATHER)
    for k in range(len(ONE_CALL) + 1):
        deltas, s = stream(ONE_CALL, [k])
        calls = [d.tool_call for d in deltas]
        start = ToolCallDelta(0, "functions.get_weather:0", "get_weather", "")
        inside = k - args_at
        if 0 < inside < len(WEATHER):
            pieces = [WEATHER[:inside], WEATHER[inside:]]
        else:
            pieces = [WEATHER]
        assert calls == [start] + [ToolCallDelta(0, None, None, p) for p in pieces], k
        assert s.tool_calls_emitted


def test_arguments_one_character_a_push():
    deltas, _ = stream(ONE_CALL, list(range(1, len(ONE_CALL))))
    assert [d.tool_call.arguments for d in deltas] == ["", *WEATHER]


def test_section_is_held_until_its_end_then_released_at_once():
    s = OutputStream()
    assert s.push(S + C + "functions.get_weather:0" + A + '{"city": ') == []
    assert s.push('"Paris"}' + CE) == []
    assert not s.tool_calls_emitted
    assert s.push(SE + "\n") == [
        Delta(tool_call=ToolCallDelta(0, "functions.get_weather:0", "get_weather", "")),
        Delta(tool_call=ToolCallDelta(0, None, None, '{"city": ')),
        Delta(tool_call=ToolCallDelta(0, None, None, '"Paris"}')),
        Delta(content="\n"),
    ]
    assert s.tool_calls_emitted
    assert s.finish() == []


def test_whitespace_pieces_around_arguments_are_dropped():
    s = OutputStream()
    out = []
    for piece in [S + C + "f:0" + A, " ", "{", "}", " \n", CE + SE]:
        out += s.push(piece)
    assert [d.tool_call.arguments for d in out] == ["", "{", "}"]


def test_long_random_splits():
    args = '{"path": "/tmp/a.txt", "text": "' + "lorem ipsum <b>dolor</b> sit amet, " * 12 + '"}'
    text = f"Let me write it.\n{S}{C}functions.write:0{A}{args}{CE}{C}functions.read:1{A}{{}}{CE}{SE}Done."
    expected = Parsed(
        "Let me write it.\nDone.",
        "",
        [ToolCall("functions.write:0", "write", args), ToolCall("functions.read:1", "read", "{}")],
    )
    assert parse(text) == expected
    rng = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 60)))
        deltas, s = stream(text, cuts)
        assert collect(deltas) == expected, cuts
        args_start = text.index(args)
        pieces = [d.tool_call.arguments for d in deltas if d.tool_call and d.tool_call.index == 0][1:]
        bounds = [0] + [c - args_start for c in cuts if 0 < c - args_start < len(args)] + [len(args)]
        assert pieces == [args[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


# -- content around a section ----------------------------------------------------------------------------------


def test_text_before_the_section():
    check(
        "I'll check the weather.\n" + ONE_CALL,
        Parsed("I'll check the weather.\n", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]),
    )


def test_text_after_the_section_is_kept():
    check(
        "Checking. " + ONE_CALL + " And more.",
        Parsed("Checking.  And more.", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]),
    )


def test_two_sections_count_indices_on():
    second = ONE_CALL.replace("get_weather:0", "get_weather:1")
    check(
        ONE_CALL + "then " + second,
        Parsed(
            "then ",
            "",
            [
                ToolCall("functions.get_weather:0", "get_weather", WEATHER),
                ToolCall("functions.get_weather:1", "get_weather", WEATHER),
            ],
        ),
    )


def test_plain_content_and_stray_markers_are_content():
    check("Hello, world.", Parsed("Hello, world.", "", []))
    stray = f"a {C}b{CE} c {SE} d </think> e <think>"
    check(stray, Parsed(stray, "", []))


def test_content_streams_at_once_holding_only_a_partial_marker():
    s = OutputStream()
    assert s.push("Hello") == [Delta(content="Hello")]
    assert s.push(" wor<|tool_ca") == [Delta(content=" wor")]
    assert s.push("ll_begin|>") == [Delta(content="<|tool_call_begin|>")]  # not a section after all
    assert s.push("x <") == [Delta(content="x ")]
    assert s.finish() == [Delta(content="<")]


# -- reasoning -------------------------------------------------------------------------------------------------


def test_reasoning_then_content():
    check("<think>The user greets me.</think>Hi!", Parsed("Hi!", "The user greets me.", []))
    check("\n <think>\nhmm\n</think>\n\nHi!", Parsed("\n\nHi!", "\nhmm\n", []))


def test_reasoning_then_tool_call():
    check(
        "<think>Need weather.</think>" + ONE_CALL,
        Parsed("", "Need weather.", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]),
    )


def test_reasoning_ended_implicitly_by_a_section():
    check(
        "<think>Need weather." + ONE_CALL + "ok",
        Parsed("ok", "Need weather.", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]),
    )


def test_reasoning_never_ended_is_all_reasoning():
    check("<think>still thinking <|tool_call_begin|> x", Parsed("", "still thinking <|tool_call_begin|> x", []))


def test_think_not_at_the_start_is_content():
    check("Hi <think>x</think>", Parsed("Hi <think>x</think>", "", []))


def test_in_reasoning():
    check("Let me think.</think>Answer.", Parsed("Answer.", "Let me think.", []), in_reasoning=True)
    check("<think>a</think>b", Parsed("b", "a", []), in_reasoning=True)  # a repeated <think> is consumed
    call = ToolCall("functions.get_weather:0", "get_weather", WEATHER)
    check(" Think." + ONE_CALL, Parsed("", " Think.", [call]), in_reasoning=True)
    check("only thoughts", Parsed("", "only thoughts", []), in_reasoning=True)


def test_reasoning_streams_at_once_holding_only_a_partial_marker():
    s = OutputStream()
    assert s.push(" <thi") == []
    assert s.push("nk>hmm") == [Delta(reasoning="hmm")]
    assert s.push(" ok</thi") == [Delta(reasoning=" ok")]
    assert s.push("nk>Yes") == [Delta(content="Yes")]
    assert s.finish() == []
    s = OutputStream()
    assert s.push("<th") == []
    assert s.push("is") == [Delta(content="<this")]


# -- forced prefixes -------------------------------------------------------------------------------------------


def test_prefix_required():
    text = f"{C}functions.get_weather:0{A}{WEATHER}{CE}{SE}"
    check(text, Parsed("", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]), prefix=S)


def test_prefix_named_function():
    prefix = f"{S}{C}functions.get_weather:0{A}"
    check(
        f"{WEATHER}{CE}{SE}",
        Parsed("", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]),
        prefix=prefix,
    )
    s = OutputStream(prefix=prefix)
    assert s.push('{"c') == []
    assert s.push('ity": "Paris"}' + CE + SE) == [
        Delta(tool_call=ToolCallDelta(0, "functions.get_weather:0", "get_weather", "")),
        Delta(tool_call=ToolCallDelta(0, None, None, '{"c')),
        Delta(tool_call=ToolCallDelta(0, None, None, 'ity": "Paris"}')),
    ]


def test_prefix_text_goes_out_with_the_first_push():
    s = OutputStream(prefix="Sure: ")
    assert s.push("x") == [Delta(content="Sure: x")]
    assert OutputStream(prefix="Sure: ").finish() == [Delta(content="Sure: ")]


def test_prefix_malformed_falls_back_with_the_prefix_in_content():
    prefix = f"{S}{C}functions.get_weather:0{A}"
    check("not json" + CE + SE, Parsed(prefix + "not json" + CE + SE, "", []), prefix=prefix)
    check("stopped early", Parsed(S + "stopped early", "", []), prefix=S)


# -- malformed sections fall back to content -------------------------------------------------------------------

MALFORMED = {
    "no argument marker": f"{S}{C}functions.get_weather:0{WEATHER}{CE}{SE}",
    "id without index": f"{S}{C}functions.get_weather{A}{WEATHER}{CE}{SE}",
    "id with a letter index": f"{S}{C}functions.get_weather:x{A}{WEATHER}{CE}{SE}",
    "id with a space": f"{S}{C}functions.get weather:0{A}{WEATHER}{CE}{SE}",
    "empty name": f"{S}{C}functions.:0{A}{WEATHER}{CE}{SE}",
    "empty id": f"{S}{C}{A}{WEATHER}{CE}{SE}",
    "section never ends": f"{S}{C}functions.get_weather:0{A}{WEATHER}{CE}",
    "call never ends": f"{S}{C}functions.get_weather:0{A}{WEATHER}{SE}",
    "call never ends, nor the section": f"{S}{C}functions.get_weather:0{A}{WEATHER}",
    "only the section marker": S,
    "empty section": f"{S}\n{SE}",
    "text between calls": f"{S}{C}a:0{A}{{}}{CE} and {C}b:1{A}{{}}{CE}{SE}",
    "text before the first call": f"{S}x{C}a:0{A}{{}}{CE}{SE}",
    "a call nested in arguments": f"{S}{C}a:0{A}{{{C}b:1{A}{{}}{CE}{SE}",
    "two argument markers": f"{S}{C}a:0{A}{{}}{A}{{}}{CE}{SE}",
    "invalid json": f'{S}{C}functions.get_weather:0{A}{{"city": Paris}}{CE}{SE}',
    "truncated json": f'{S}{C}functions.get_weather:0{A}{{"city": "Par{CE}{SE}',
    "empty arguments": f"{S}{C}functions.get_weather:0{A} {CE}{SE}",
    "too deep json": f"{S}{C}a:0{A}{'[' * 100000}{']' * 100000}{CE}{SE}",
    "one good call, one bad": f"{S}{C}a:0{A}{{}}{CE}{C}b:1{A}{{oops}}{CE}{SE}",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_section_is_content(name):
    raw = MALFORMED[name]
    if name == "too deep json":  # too long to try every split
        assert parse(raw) == Parsed(raw, "", [])
        deltas, s = stream(raw, [5, 500, len(raw) - 3])
        assert collect(deltas) == Parsed(raw, "", []) and not s.tool_calls_emitted
        return
    check(raw, Parsed(raw, "", []))
    check("Let me see. " + raw, Parsed("Let me see. " + raw, "", []))


def test_malformed_section_then_a_good_one():
    bad = MALFORMED["invalid json"]
    check(
        "a" + bad + "b" + ONE_CALL + "c",
        Parsed("a" + bad + "bc", "", [ToolCall("functions.get_weather:0", "get_weather", WEATHER)]),
    )


def test_malformed_after_reasoning_keeps_the_reasoning():
    bad = MALFORMED["section never ends"]
    check("<think>plan</think>" + bad, Parsed(bad, "plan", []))
    check("<think>plan" + bad, Parsed(bad, "plan", []))  # implicit end of reasoning, then a bad section


# -- text as it is ---------------------------------------------------------------------------------------------


def test_chinese_text_and_arguments_intact():
    args = '{"city": "北京", "note": "明天会下雨吗？"}'
    text = f"<think>用户想知道北京的天气。</think>我来查一下。{S}{C}functions.查询天气:0{A}{args}{CE}{SE}好的。"
    check(
        text,
        Parsed("我来查一下。好的。", "用户想知道北京的天气。", [ToolCall("functions.查询天气:0", "查询天气", args)]),
    )


def test_empty_output():
    check("", Parsed("", "", []))
    s = OutputStream()
    assert s.push("") == [] and s.finish() == [] and not s.tool_calls_emitted
    check("  \n", Parsed("  \n", "", []))


def test_push_after_finish_is_refused():
    s = OutputStream()
    s.finish()
    assert s.finish() == []
    with pytest.raises(RuntimeError):
        s.push("x")


def test_delta_carries_exactly_one_field():
    with pytest.raises(ValueError):
        Delta()
    with pytest.raises(ValueError):
        Delta(content="a", reasoning="b")


def test_without_tools_sections_are_content():
    text = "<think>a" + SECTION_BEGIN + "b</think>x" + SECTION_BEGIN + "y"
    for split in range(len(text) + 1):
        s = OutputStream(tools=False)
        deltas = s.push(text[:split]) + s.push(text[split:]) + s.finish()
        assert "".join(d.reasoning or "" for d in deltas) == "a" + SECTION_BEGIN + "b"
        assert "".join(d.content or "" for d in deltas) == "x" + SECTION_BEGIN + "y"
        assert not s.tool_calls_emitted
    assert parse(text, tools=False) == Parsed(content="x" + SECTION_BEGIN + "y", reasoning="a" + SECTION_BEGIN + "b")
