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

from k2quant.errors import K2QuantError

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


MAX_SPECIAL_CHARS = 64  # K2's longest special token, <|tool_calls_section_begin|>, has 28


class TokenizerError(K2QuantError):
    """tiktoken.model or tokenizer_config.json cannot be used; names the file."""


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
    """Load tiktoken.model (and the special-token names from tokenizer_config.json if present).
    FileNotFoundError without tiktoken.model; TokenizerError, naming the file, for one k2quant cannot use."""
    d = Path(path)
    ranks = read_ranks(d / TIKTOKEN_FILE)
    num_base = len(ranks)
    specials = special_tokens(num_base)
    cfg_path = d / CONFIG_FILE
    if cfg_path.exists():
        specials = _config_specials(cfg_path, specials, num_base)
        missing = [t for t in ("[BOS]", "[EOS]", "<|im_end|>") if t not in specials]
        if missing:  # K2Tokenizer.bos_id, eos_id and im_end_id look them up by name
            raise TokenizerError(
                f"{cfg_path}: added_tokens_decoder leaves no {missing[0]} token, which K2's format needs"
            )
    try:
        enc = tiktoken.Encoding(name=d.name or "k2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:  # its regex of the special tokens grows past the regex engine's size limit
        raise TokenizerError(
            f"{cfg_path if cfg_path.exists() else d / TIKTOKEN_FILE}: tiktoken refuses it ({e})"
        ) from None
    return K2Tokenizer(enc, num_base)


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model's `<base64 token> <rank>` lines, parsed as tiktoken parses them, then checked: tiktoken
    panics (a pyo3 PanicException, not an Exception) on ranks that repeat and on bytes it has no token for;
    K2's special tokens take the ids after the ranks, so the ranks must be 0 .. n-1.

    Read here, not by tiktoken's load_tiktoken_bpe: that keeps a copy of every file it reads in a cache keyed
    by the file's path ($TIKTOKEN_CACHE_DIR, else /tmp/data-gym-cache) and reads the copy from then on, so a
    tiktoken.model edited or replaced at the same path would go unseen."""
    data = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            tok, r = base64.b64decode(token), int(rank)
        except ValueError:  # not two fields, bad base64 padding (binascii.Error), a rank that is no int
            raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
        if tok in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {tok!r} listed twice (ranks {ranks[tok]} and {r})")
        ranks[tok] = r
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: the ranks are not 0 .. {len(ranks) - 1}, each once")
    # tiktoken panics on a byte it has no token for; text holds every byte but those UTF-8 never uses
    missing = [b for b in range(256) if bytes([b]) not in ranks and b not in _NOT_IN_UTF8]
    if missing:
        raise TokenizerError(
            f"{path}: no token for byte {missing[0]} ({len(missing)} bytes missing): not byte-level BPE"
        )
    return ranks


_NOT_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}


def _config_specials(cfg_path: Path, specials: dict[str, int], num_base: int) -> dict[str, int]:
    """K2's special tokens renamed by tokenizer_config.json's added_tokens_decoder (ids num_base .. +255)."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
        raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
    decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or not isinstance(decoder, dict | None):
        raise TokenizerError(f"{cfg_path}: not a JSON object with an added_tokens_decoder object")
    if not decoder:
        return specials
    by_id = {v: k for k, v in specials.items()}
    for sid, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not (sid.isascii() and sid.isdigit() and num_base <= int(sid) < num_base + NUM_RESERVED_SPECIAL):
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder id {sid!r} is not one of the special ids "
                                 f"{num_base} .. {num_base + NUM_RESERVED_SPECIAL - 1}")  # fmt: skip
        # an empty special token makes tiktoken's encoder loop forever, long ones make its regex of them too
        # large to build (memory first); a lone surrogate cannot be encoded
        if not isinstance(content, str) or not 0 < len(content) <= MAX_SPECIAL_CHARS:
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder {sid}: content {content!r:.100} is not a token")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder {sid}: content {content!r} is not UTF-8") from None
        by_id[int(sid)] = content
    out = {tok: i for i, tok in by_id.items()}
    if len(out) != len(by_id):
        raise TokenizerError(f"{cfg_path}: added_tokens_decoder gives two special ids the same content")
    return out


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
