"""The chat template (formats/chat.py): mini-K2's own template renders as transformers renders it and
as render_chat does; a checkpoint's template runs sandboxed and fails as one ChatTemplateError naming
its file; llama.cpp still recognizes the template as Kimi K2's; mini-K2 ships the template."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest
from tiktoken.load import load_tiktoken_bpe
from transformers.utils import chat_template_utils as hf_chat

from k2quant import minik2
from k2quant.errors import K2QuantError
from k2quant.formats.chat import BUILTIN, K2_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, render_chat
from k2quant.formats.tokenizer import render_chat as tokenizer_render_chat
from k2quant.formats.tokenizer import save_tokenizer

from .llamacpp import llama_chat_format

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "当前天气 (current weather)",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"unit": {"enum": ["c", "f"]}, "city": {"type": "string"}}},
    },
}  # fmt: skip
FILES = {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}}}


def call(i: int, args, name: str = "get_weather") -> dict:
    return {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = {
    "plain": ([{"role": "user", "content": "Hello"}], None),
    "empty": ([], None),
    "chinese": (
        [
            {"role": "user", "content": "北京今天天气怎么样？"},
            {"role": "assistant", "content": "晴，25°C。"},
            {"role": "user", "content": "明天呢？"},
        ],
        None,
    ),
    "system": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
        ],
        None,
    ),
    "tools_declared": ([{"role": "user", "content": "Weather in Oslo?"}], [WEATHER, FILES]),
    "tool_calls": (
        [
            {"role": "user", "content": "Weather in 北京 and Paris, then list files"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call(0, {"city": "北京", "unit": "c"}),
                    call(1, '{"city": "Paris"}'),
                    call(2, {}, "list_files"),
                ],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 25}'},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "rain"},
            {"role": "tool", "tool_call_id": "functions.list_files:2", "name": "list_files", "content": "a.py"},
        ],
        [WEATHER, FILES],
    ),
    "content_parts": (
        [
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "part two."}],
            },
            {"role": "assistant", "content": "", "tool_calls": [call(0, {"city": "Oslo"})]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": [{"type": "text", "text": "snow"}]},
        ],
        [WEATHER],
    ),
    "reasoning_around_last_user": (
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1", "reasoning_content": "old thoughts, dropped"},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "need the tool",
                "tool_calls": [call(0, {"city": "Oslo"})],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "snow"},
            {
                "role": "assistant",
                "content": "",
                "reasoning": "maybe Bergen too",  # vLLM's newer name
                "tool_calls": [call(1, '{"city": "Bergen"}')],
            },
        ],
        [WEATHER],
    ),
    "final_answer": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "call it",
                "tool_calls": [call(0, {"city": "Oslo"})],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "snow"},
            {"role": "assistant", "content": "Snow in Oslo.", "reasoning_content": "answer now"},
        ],
        [WEATHER],
    ),
    "names_and_other_roles": (
        [
            {"role": "developer", "content": "dev note"},
            {"role": "user", "name": "alice", "content": "hi"},
            {"role": "assistant", "name": "kimi", "content": "hello"},
        ],
        None,
    ),
}


def transformers_render(template: str, messages, tools, add_generation_prompt: bool, **kwargs) -> str:
    """transformers' own chat-template renderer, given messages as apply_chat_template hands them over."""
    normalize = getattr(hf_chat, "_normalize_chat_messages", lambda ms: [{k: v for k, v in m.items() if v is not None}
                                                                          for m in ms])  # fmt: skip
    rendered, _ = hf_chat.render_jinja_template([normalize(messages)], tools=tools, chat_template=template,
                                                add_generation_prompt=add_generation_prompt, **kwargs)  # fmt: skip
    return rendered[0]


@pytest.fixture(scope="module")
def mini_template(mini_k2) -> ChatTemplate:
    return ChatTemplate.load(mini_k2["fp8"])


def special_tokens(model_dir) -> dict[str, str]:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token")}


# ---------------------------------------------------------------------------- one format, three renderers
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_mini_k2_template_renders_as_transformers_and_render_chat(mini_template, mini_k2, name, add_generation_prompt):
    messages, tools = CONVERSATIONS[name]
    assert mini_template.source == K2_CHAT_TEMPLATE
    assert mini_template.file == str(mini_k2["fp8"] / "tokenizer_config.json")
    ours = mini_template.render(messages, tools, add_generation_prompt=add_generation_prompt)
    theirs = transformers_render(mini_template.source, messages, tools, add_generation_prompt,
                                 **special_tokens(mini_k2["fp8"]))  # fmt: skip
    assert ours == theirs
    assert render_chat(messages, tools, add_generation_prompt) == ours
    assert tokenizer_render_chat is render_chat
    assert ours.endswith("<|im_assistant|>assistant<|im_middle|>") == add_generation_prompt


def test_the_k2_format_in_full():
    messages, tools = CONVERSATIONS["reasoning_around_last_user"]
    text = render_chat(messages, tools)
    declared = json.dumps([WEATHER], ensure_ascii=False, separators=(",", ":"))
    assert declared.startswith('[{"type":"function","function":{"name":"get_weather","description":"当前天气')
    assert text == (
        f"<|im_system|>tool_declare<|im_middle|>{declared}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Q1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>A1<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Oslo?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>need the tool</think>Checking.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsnow<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>maybe Bergen too</think><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Bergen"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    # K2-Thinking's split: the last assistant message without tool calls closes the history
    final = render_chat(*CONVERSATIONS["final_answer"], add_generation_prompt=False)
    assert "<think>call it</think>" not in final and final.endswith("<think></think>Snow in Oslo.<|im_end|>")
    assert "<|im_system|>system<|im_middle|>You are terse.<|im_end|><|im_user|>" in render_chat(
        *CONVERSATIONS["system"]
    )
    assert "You are Kimi" not in render_chat(*CONVERSATIONS["system"])


def test_only_text_content_parts():
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ChatTemplateError, match="text"):
        render_chat(image)
    with pytest.raises(ChatTemplateError, match="<kimi>: the chat template refused the conversation.*text"):
        ChatTemplate.from_string(K2_CHAT_TEMPLATE, "<kimi>").render(image)


# ---------------------------------------------------------------------------- loading
def test_load_finds_the_template_as_transformers_does(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert ChatTemplate.load(d).builtin and ChatTemplate.load(d).file == BUILTIN
    messages = CONVERSATIONS["tool_calls"][0]
    assert ChatTemplate.load(d).render(messages, [WEATHER]) == render_chat(messages, [WEATHER])
    cfg = {
        "bos_token": {"content": "[BOS]"},
        "eos_token": "[EOS]",
        "chat_template": "config:{{ bos_token }}{{ eos_token }}",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert ChatTemplate.load(d).render([]) == "config:[BOS][EOS]"
    (d / "chat_template.jinja").write_text("file:{{ messages | length }}{{ thinking }}", encoding="utf-8")
    t = ChatTemplate.load(d)
    assert t.file == str(d / "chat_template.jinja")
    assert t.render([{"role": "user", "content": "x"}], thinking=False) == "file:1False"
    (d / "chat_template.jinja").unlink()
    cfg["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    t = ChatTemplate.load(d)
    assert t.render([]) == "D" and t.render([], tools=[WEATHER]) == "T"
    cfg["chat_template"] = [{"name": "rag", "template": "R"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: .*\['rag'\].*'default'"):
        ChatTemplate.load(d)
    (d / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json: not valid JSON"):
        ChatTemplate.load(d)


def test_filters_and_globals_behave_as_transformers():
    template = (
        "{{ x | tojson }}|{{ x | tojson(indent=2, sort_keys=True) }}|{{ x | tojson(separators=(',', ':')) }}|"
        "{{ strftime_now('%Y') }}|{% set ns = namespace(n=0) %}{% for i in range(3) %}{% if i == 2 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ dict(a=1) | tojson }}\n  {% if true %}\n"
        "    kept\n  {% endif %}\n"
    )
    x = {"b": "北京 <&>", "a": [1, 2.5, None, True]}
    ours = ChatTemplate.from_string(template).render([], x=x)
    assert ours == transformers_render(template, [], None, True, x=x)
    assert f"|{datetime.now().year}|2|" in ours and '"北京 <&>"' in ours


# ---------------------------------------------------------------------------- the sandbox
HOSTILE = {
    "python internals": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox forbids"),
    "globals of a function": ("{{ raise_exception.__globals__['os'] }}", "sandbox forbids"),
    "mutating the input": ("{% set _ = messages.append(1) %}", "sandbox forbids"),
    "namespace underscore": ("{% set ns = namespace(_secret=1) %}", "underscore"),
    "include": ("{% include 'x' %}", "may not include, import or extend.*'x'"),
    "import": ("{% import '/etc/passwd' as p %}", "may not include, import or extend.*passwd"),
    "extends": ("{% extends 'base.jinja' %}", "may not include, import or extend"),
    "raise_exception": ("{{ raise_exception('boom') }}", "refused the conversation.*boom"),
    "undefined": ("{{ messages[0].content.nope.deeper }}", "undefined value"),
    "python error": ("{{ 1 // 0 }}", "ZeroDivisionError"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_or_broken_template_is_one_error_naming_its_file(tmp_path, name):
    source, problem = HOSTILE[name]
    d = tmp_path / "m"
    d.mkdir()
    cfg = d / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": source}), encoding="utf-8")
    t = ChatTemplate.load(d)
    with pytest.raises(ChatTemplateError, match=problem) as e:
        t.render([{"role": "user", "content": "hi"}])
    assert str(e.value).startswith(f"{cfg}: ") and e.value.file == str(cfg)
    assert isinstance(e.value, K2QuantError)


def test_a_syntax_error_fails_at_load_naming_the_file_and_line(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "chat_template.jinja").write_text("ok\n{% if messages %}never closed", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja: chat template syntax error on line 2") as e:
        ChatTemplate.load(d)
    assert e.value.file == str(d / "chat_template.jinja")


def test_messages_must_be_a_list_of_objects():
    t = ChatTemplate.from_string(K2_CHAT_TEMPLATE, "k2.jinja")
    with pytest.raises(ChatTemplateError, match="k2.jinja: messages must be a list"):
        t.render("hello")
    with pytest.raises(ChatTemplateError, match="k2.jinja: message 1 is not an object"):
        t.render([{"role": "user", "content": "a"}, "b"])


# ---------------------------------------------------------------------------- peers and mini-K2
def test_llama_cpp_recognizes_the_template_as_kimi_k2s(mini_template):
    system_user = [("system", "You are terse."), ("user", "你好，Kimi")]
    expected = render_chat([{"role": r, "content": c} for r, c in system_user])
    assert llama_chat_format(mini_template.source, system_user) == expected
    turns = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]
    assert llama_chat_format(mini_template.source, turns, add_assistant=False) == (
        "<|im_user|>user<|im_middle|>Q1<|im_end|><|im_assistant|>assistant<|im_middle|>A1<|im_end|>"
        "<|im_user|>user<|im_middle|>Q2<|im_end|>"
    )


def test_mini_k2_ships_the_template_as_a_fresh_build_writes_it(mini_k2, tmp_path):
    fresh = tmp_path / "fresh"
    save_tokenizer(fresh, load_tiktoken_bpe(str(mini_k2["fp8"] / "tiktoken.model")), chat_template=K2_CHAT_TEMPLATE)
    written = (fresh / "tokenizer_config.json").read_bytes()
    for d in ("fp8", "bf16"):
        assert (mini_k2[d] / "tokenizer_config.json").read_bytes() == written
    # a build made before the template existed is brought up to date byte for byte, weights untouched
    old = tmp_path / "old"
    for d in ("tokenizer", "model-fp8"):
        (old / d).mkdir(parents=True)
        cfg = json.loads(written)
        del cfg["chat_template"]
        (old / d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    shutil.copy(mini_k2["fp8"] / "config.json", old / "model-fp8" / "config.json")
    minik2._update_chat_template(old)
    for d in ("tokenizer", "model-fp8"):
        assert (old / d / "tokenizer_config.json").read_bytes() == written
    assert (old / "model-fp8" / "config.json").read_bytes() == (mini_k2["fp8"] / "config.json").read_bytes()
