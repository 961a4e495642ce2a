"""Kimi K2's tokenizer: tiktoken.model ranks, K2's pre-tokenizer, special tokens (chat format: chat.py).

The same code loads the real K2 tokenizer (163584 ranks + 256 specials) and mini-K2's
(trained by `train_bpe`). tiktoken does the encoding; the `regex` package is needed only
to train (it must be used with the V1 flag for the `&&` class intersections).
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# K2's chat format lives in chat.py (beside the Jinja template it must agree with); re-exported here
from k2quant.formats.chat import render_chat as render_chat

# K2's pre-tokenizer: Han runs split apart, letters without Han, digits in threes, ...
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_RESERVED_SPECIAL = 256
# offset from the first special id -> token (K2's tokenizer_config.json added_tokens_decoder)
SPECIAL_OFFSETS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    254: "[UNK]",
    255: "[PAD]",
}
TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"


def special_tokens(num_base: int) -> dict[str, int]:
    """All 256 special tokens, unnamed ones as <|reserved_token_{id}|>, as K2's tokenizer does."""
    out = {}
    for off in range(NUM_RESERVED_SPECIAL):
        i = num_base + off
        out[SPECIAL_OFFSETS.get(off, f"<|reserved_token_{i}|>")] = i
    return out


@dataclass
class K2Tokenizer:
    """tiktoken Encoding plus K2's special tokens and chat format."""

    encoding: tiktoken.Encoding
    num_base: int

    @property
    def vocab_size(self) -> int:
        return self.num_base + NUM_RESERVED_SPECIAL

    def special(self, token: str) -> int:
        return self.encoding._special_tokens[token]

    @property
    def bos_id(self) -> int:
        return self.special("[BOS]")

    @property
    def eos_id(self) -> int:
        return self.special("[EOS]")

    @property
    def im_end_id(self) -> int:
        return self.special("<|im_end|>")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.encoding.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self, i: int) -> bytes:
        return self.encoding.decode_single_token_bytes(i)


def load_tokenizer(path: str | Path) -> K2Tokenizer:
    """Load tiktoken.model (and the special-token names from tokenizer_config.json if present)."""
    d = Path(path)
    ranks = load_tiktoken_bpe(str(d / TIKTOKEN_FILE))
    num_base = len(ranks)
    specials = special_tokens(num_base)
    cfg_path = d / CONFIG_FILE
    if cfg_path.exists():
        decoder = json.loads(cfg_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        if decoder:
            by_id = {v: k for k, v in specials.items()}
            for sid, entry in decoder.items():
                by_id[int(sid)] = entry["content"] if isinstance(entry, dict) else str(entry)
            specials = {tok: i for i, tok in by_id.items()}
    enc = tiktoken.Encoding(name=d.name or "k2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    return K2Tokenizer(enc, num_base)


# ---------------------------------------------------------------------------- training
def train_bpe(texts: Iterable[str], num_base: int) -> dict[bytes, int]:
    """Byte-level BPE over K2's pre-tokens: 256 byte tokens, then merges, `num_base` ranks in all.

    Deterministic: ties in pair frequency go to the smallest pair of byte strings. Pair
    counts are updated incrementally, with a lazy max-heap, so training is seconds.
    """
    import regex

    pat = regex.compile(PAT_STR, flags=regex.V1)
    words: Counter[bytes] = Counter()
    for text in texts:
        for piece in pat.findall(text):
            words[piece.encode("utf-8")] += 1
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    seqs = [[bytes([b]) for b in w] for w in words]
    freqs = list(words.values())
    pair_count: Counter[tuple[bytes, bytes]] = Counter()
    where: dict[tuple[bytes, bytes], set[int]] = {}
    for wi, seq in enumerate(seqs):
        for a, b in zip(seq, seq[1:], strict=False):
            pair_count[(a, b)] += freqs[wi]
            where.setdefault((a, b), set()).add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < num_base and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:
            continue  # stale entry: the count changed since it was pushed
        if -neg < 2:
            break
        merged = a + b
        vocab.append(merged)
        touched: set[tuple[bytes, bytes]] = set()
        for wi in sorted(where.pop((a, b), ())):
            seq, f = seqs[wi], freqs[wi]
            for x, y in zip(seq, seq[1:], strict=False):
                pair_count[(x, y)] -= f
                touched.add((x, y))
            new, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    new.append(merged)
                    i += 2
                else:
                    new.append(seq[i])
                    i += 1
            seqs[wi] = new
            for x, y in zip(new, new[1:], strict=False):
                pair_count[(x, y)] += f
                where.setdefault((x, y), set()).add(wi)
                touched.add((x, y))
        pair_count.pop((a, b), None)
        for pair in sorted(touched):
            c = pair_count.get(pair, 0)
            if c <= 0:
                pair_count.pop(pair, None)
            elif pair != (a, b):
                heapq.heappush(heap, (-c, *pair))
    return {tok: rank for rank, tok in enumerate(vocab)}


def save_tokenizer(out: str | Path, ranks: dict[bytes, int], chat_template: str | None = None) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (d / TIKTOKEN_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    num_base = len(ranks)
    specials = special_tokens(num_base)
    cfg = {
        "tokenizer_class": "TikTokenTokenizer",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 1048576,
        "added_tokens_decoder": {
            str(i): {"content": tok, "special": not tok.startswith("<|tool_call")} for tok, i in specials.items()
        },
        "additional_special_tokens": [SPECIAL_OFFSETS[o] for o in (2, 3, 4, 6, 7, 9, 10, 17)],
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
