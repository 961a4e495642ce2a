"""K2's tokenizer format: tiktoken.model ranks, K2's pre-tokenizer, specials, chat format."""

from __future__ import annotations

import re

import pytest
import regex
from tiktoken.load import load_tiktoken_bpe

from k2quant.formats.tokenizer import PAT_STR, load_tokenizer, render_chat, save_tokenizer, train_bpe

TEXTS = [
    "def tokenize(text):\n    return [t for t in text.split() if t]\n" * 20,
    "The keeper counted the steps every evening, and wrote the number down. " * 20,
    "灯塔看守人每天傍晚都会数台阶，然后把数字写进账本里。" * 20,
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d, train_bpe(TEXTS, 400))
    return load_tokenizer(d)


def test_pre_tokenizer_matches_k2():
    # shared/reference/k2-checkpoint.md §8.3, with regex's V1 flag
    pieces = regex.compile(PAT_STR, flags=regex.V1).findall("Hello世界 it's 12345 DONTStop\n\n  x")
    assert pieces == ["Hello", "世界", " it's", " ", "123", "45", " DONTStop", "\n\n", " ", " x"]


def test_training_is_deterministic():
    assert train_bpe(TEXTS, 400) == train_bpe(TEXTS, 400)


def test_file_format_and_round_trip(tok, tmp_path):
    save_tokenizer(tmp_path, train_bpe(TEXTS, 400))
    lines = (tmp_path / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 400 and all(re.fullmatch(r"[A-Za-z0-9+/=]+ \d+", ln) for ln in lines)
    ranks = load_tiktoken_bpe(str(tmp_path / "tiktoken.model"))
    assert sorted(ranks.values()) == list(range(400))
    for text in TEXTS + ["unseen words, ünïcödé and 数字 12345 \t\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1].encode()) / 3  # merges were learned


def test_han_runs_never_share_a_token_with_latin(tok):
    for i in tok.encode("abc中文def数字"):
        s = tok.token_bytes(i).decode("utf-8", errors="ignore")
        assert not (re.search(r"[a-z]", s) and re.search(r"[\u4e00-\u9fff]", s))


def test_special_tokens_follow_k2_offsets(tok):
    base = 400
    assert tok.vocab_size == base + 256
    assert tok.bos_id == base and tok.eos_id == base + 1 and tok.im_end_id == base + 2
    assert tok.special("<|im_user|>") == base + 3 and tok.special("<|im_assistant|>") == base + 4
    assert tok.special("<|im_system|>") == base + 10 and tok.special("<|im_middle|>") == base + 17
    assert tok.special("<|tool_call_begin|>") == base + 13 and tok.special("[PAD]") == base + 255
    assert tok.encode("<|im_end|>", allow_special=True) == [base + 2]
    assert len(tok.encode("<|im_end|>")) > 1  # plain text unless specials are allowed


def test_chat_format():
    text = render_chat(
        [
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "What is 1+1?"},
            {"role": "assistant", "content": "2"},
        ],
        add_generation_prompt=False,
    )
    assert text == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 1+1?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>2<|im_end|>"  # K2-Thinking: history drops reasoning
    )


def test_tool_calls_parse_with_k2_regex():
    tools = [{"type": "function", "function": {"name": "get_tide", "parameters": {"type": "object"}}}]
    call = {"id": "functions.get_tide:0", "function": {"name": "get_tide", "arguments": {"hour": 6, "harbour": "s"}}}
    text = render_chat(
        [{"role": "user", "content": "tide?"}, {"role": "assistant", "content": "", "tool_calls": [call]}], tools
    )
    assert text.startswith('<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_tide"')
    # docs/tool_call_guidance.md's parser
    pat = (
        r"<\|tool_call_begin\|>\s*(?P<tool_call_id>[\w\.]+:\d+)\s*<\|tool_call_argument_begin\|>\s*"
        r"(?P<function_arguments>.*?)\s*<\|tool_call_end\|>"
    )
    m = re.search(pat, text)
    assert m["tool_call_id"] == "functions.get_tide:0"
    assert m["function_arguments"] == '{"hour": 6, "harbour": "s"}'  # as K2's template's tojson: keys as given
