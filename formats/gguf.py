"""GGUF for llama.cpp (architecture deepseek2): names, metadata, tokenizer, and reading back.

Checkpoint names are k2quant's everywhere else; this module is the one place that knows
llama.cpp's. It maps a K2 checkpoint onto llama.cpp's tensors (kv_b_proj split into
attn_k_b / attn_v_b with num_attention_heads, routed experts stacked per layer, router
and norms in F32, the correction bias as exp_probs_b.bias), writes every metadata key
llama.cpp's deepseek2 loader reads (its silent defaults are wrong for K2: softmax
gating, rope dimension 576, no weight scale), converts the tiktoken vocabulary to
llama.cpp's gpt2-style tokens and merges with pre-tokenizer kimi-k2, and opens GGUF files
(k2quant's or other converters') as a checkpoint the forward can run.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from k2quant.config import K2Config
from k2quant.errors import K2QuantError
from k2quant.formats.chat import K2_CHAT_TEMPLATE
from k2quant.quant import ggml

ARCH = "deepseek2"

# checkpoint module suffix (after model.layers.N.) -> GGUF base name (blk.N.<base>.weight)
LAYER_LINEARS = {
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.q_proj": "attn_q",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    # llama.cpp's model splits kv_b into attn_k_b / attn_v_b, whose inputs differ from kv_b's;
    # imatrix entries for kv_b's own input use the legacy deepseek2 name attn_kv_b
    "self_attn.kv_b_proj": "attn_kv_b",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
EXPERT_LINEARS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
LAYER_OTHERS = {  # checkpoint tensor suffix -> GGUF tensor suffix (always F32)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
}
GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
_BY_GGUF = {v: k for k, v in LAYER_LINEARS.items()}
_EXPERTS_BY_GGUF = {v: k for k, v in EXPERT_LINEARS.items()}
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_GGUF = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


class GGUFError(K2QuantError):
    pass


# ---------------------------------------------------------------------------- names
def gguf_linear(module: str) -> tuple[str, int | None] | None:
    """Checkpoint linear module -> (GGUF tensor name, expert index or None); None if llama.cpp has no such linear."""
    if module == "lm_head":
        return "output.weight", None
    m = _MODULE.match(module)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    e = _EXPERT.match(rest)
    if e:
        return f"blk.{layer}.{EXPERT_LINEARS[e.group(2)]}.weight", int(e.group(1))
    if rest in ("self_attn.attn_k_b", "self_attn.attn_v_b"):  # per-head inputs observed by calibration
        return f"blk.{layer}.{rest.split('.')[1]}.weight", None
    base = LAYER_LINEARS.get(rest)
    return (f"blk.{layer}.{base}.weight", None) if base else None


def checkpoint_linear(gguf_name: str, expert: int | None = None) -> str | None:
    """GGUF tensor name (+ expert index for *_exps) -> checkpoint linear module, or None if unknown."""
    if gguf_name == "output.weight":
        return "lm_head"
    m = _GGUF.match(gguf_name)
    if not m:
        return None
    layer, base = m.group(1), m.group(2)
    if base in _EXPERTS_BY_GGUF:
        return None if expert is None else f"model.layers.{layer}.mlp.experts.{expert}.{_EXPERTS_BY_GGUF[base]}"
    rest = _BY_GGUF.get(base)
    return f"model.layers.{layer}.{rest}" if rest else None


# ---------------------------------------------------------------------------- tensor map
@dataclass
class GGUFTensor:
    """One tensor of the GGUF model and the checkpoint tensors it is made of."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first); rows are the last axis
    sources: tuple[str, ...]  # checkpoint tensor names; stacked experts in expert order
    kind: str  # "plain" | "k_b" | "v_b" | "experts" | "f32"
    layer: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def modules(self) -> list[str]:
        return [s.removesuffix(".weight") for s in self.sources]


def tensor_map(cfg: K2Config) -> list[GGUFTensor]:
    """Every tensor llama.cpp's deepseek2 model loads, in the order k2quant writes them."""
    H, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    out = [GGUFTensor("token_embd.weight", (cfg.vocab_size, cfg.hidden_size), ("model.embed_tokens.weight",), "plain")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def lin(mod: str, shape: tuple[int, ...], i=i, p=p) -> GGUFTensor:
            return GGUFTensor(f"blk.{i}.{LAYER_LINEARS[mod]}.weight", shape, (p + mod + ".weight",), "plain", i)

        def f32(src: str, shape: tuple[int, ...], i=i, p=p) -> GGUFTensor:
            return GGUFTensor(f"blk.{i}.{LAYER_OTHERS[src]}", shape, (p + src,), "f32", i)

        out.append(f32("input_layernorm.weight", (cfg.hidden_size,)))
        if cfg.q_lora_rank:
            out += [lin("self_attn.q_a_proj", (cfg.q_lora_rank, cfg.hidden_size)),
                    f32("self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,)),
                    lin("self_attn.q_b_proj", (H * cfg.qk_head_dim, cfg.q_lora_rank))]  # fmt: skip
        else:
            out.append(lin("self_attn.q_proj", (H * cfg.qk_head_dim, cfg.hidden_size)))
        kv_b = (p + "self_attn.kv_b_proj.weight",)
        out += [
            lin("self_attn.kv_a_proj_with_mqa", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size)),
            f32("self_attn.kv_a_layernorm.weight", (cfg.kv_lora_rank,)),
            GGUFTensor(f"blk.{i}.attn_k_b.weight", (H, cfg.kv_lora_rank, nope), kv_b, "k_b", i),
            GGUFTensor(f"blk.{i}.attn_v_b.weight", (H, v, cfg.kv_lora_rank), kv_b, "v_b", i),
            lin("self_attn.o_proj", (cfg.hidden_size, H * v)),
            f32("post_attention_layernorm.weight", (cfg.hidden_size,)),
        ]
        if not cfg.is_moe(i):
            out += [lin("mlp.gate_proj", (cfg.intermediate_size, cfg.hidden_size)),
                    lin("mlp.up_proj", (cfg.intermediate_size, cfg.hidden_size)),
                    lin("mlp.down_proj", (cfg.hidden_size, cfg.intermediate_size))]  # fmt: skip
            continue
        E, ff = cfg.n_routed_experts, cfg.moe_intermediate_size
        out += [f32("mlp.gate.weight", (E, cfg.hidden_size)), f32("mlp.gate.e_score_correction_bias", (E,))]
        for proj, shape in (("gate_proj", (E, ff, cfg.hidden_size)), ("up_proj", (E, ff, cfg.hidden_size)),
                            ("down_proj", (E, cfg.hidden_size, ff))):  # fmt: skip
            srcs = tuple(f"{p}mlp.experts.{e}.{proj}.weight" for e in range(E))
            out.append(GGUFTensor(f"blk.{i}.{EXPERT_LINEARS[proj]}.weight", shape, srcs, "experts", i))
        sh = ff * cfg.n_shared_experts
        out += [lin("mlp.shared_experts.gate_proj", (sh, cfg.hidden_size)),
                lin("mlp.shared_experts.up_proj", (sh, cfg.hidden_size)),
                lin("mlp.shared_experts.down_proj", (cfg.hidden_size, sh))]  # fmt: skip
    out.append(GGUFTensor("output_norm.weight", (cfg.hidden_size,), ("model.norm.weight",), "f32"))
    lm = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out.append(GGUFTensor("output.weight", (cfg.vocab_size, cfg.hidden_size), (lm,), "plain"))
    return out


def split_kv_b(w: torch.Tensor, cfg: K2Config, part: str) -> torch.Tensor:
    """kv_b_proj [H*(nope+v), kv_lora] -> attn_k_b [H, kv_lora, nope] or attn_v_b [H, v, kv_lora]."""
    H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    w = w.view(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)
    return w[:, :nope].transpose(1, 2).contiguous() if part == "k_b" else w[:, nope:].contiguous()


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of split_kv_b."""
    return torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, k_b.shape[1])


# ---------------------------------------------------------------------------- writing
ALIGN = 32  # general.alignment: every tensor's data starts at a multiple of it


class GGUFFileWriter:
    """One GGUF file as llama.cpp reads it: key/values and tensor infos encoded by gguf-py, then the
    tensors' bytes, each aligned to ALIGN, every byte written through `sink` (a binary file object:
    convert's HashingFile, which hashes what it writes). The one place that reaches past gguf-py's
    writer's add_* methods (its key list and its file handle), so converters see only this:

        w = GGUFFileWriter(tmp, model_keys=True)
        add_metadata(w.keys, ...)             # gguf-py's add_* methods
        w.add_tensor(name, shape, "Q4_K", nbytes)
        sink = w.start(open_sink)             # header, key/values, tensor infos
        w.tensor(pieces)                      # each tensor's bytes in order; returns how many
        w.close()
    """

    def __init__(self, tmp: str | Path, model_keys: bool = True):
        import gguf

        self.keys = gguf.GGUFWriter(str(tmp), ARCH)
        if not model_keys:  # as gguf-split: the model's keys only in the first file
            self.keys.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        self.sink = None

    def add_split(self, index: int, count: int, tensors: int) -> None:
        import gguf

        self.keys.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, index)
        self.keys.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, count)
        self.keys.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, tensors)

    def add_tensor(self, name: str, shape: tuple[int, ...], typ: str, nbytes: int) -> None:
        """A tensor's info: GGML type `typ`, logical shape (rows..., columns)."""
        import gguf

        row_bytes = ggml.TYPES[typ].row_bytes(shape[-1])
        self.keys.add_tensor_info(name, (*shape[:-1], row_bytes), np.dtype(np.uint8), nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType(ggml.TYPES[typ].id))  # fmt: skip

    def start(self, open_sink):
        """Write the header, key/values and tensor infos into the sink `open_sink()` opens, and return it
        (gguf-py creates the file and checks its own state first; its handle is swapped for the sink)."""
        w = self.keys
        w.open_output_file()
        w.fout[0].close()
        w.fout[0] = self.sink = open_sink()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        return self.sink

    def tensor(self, pieces) -> int:
        """One tensor's data from `pieces` (bytes), aligned before and padded after; the bytes written."""
        f = self.sink
        f.write(b"\0" * (-f.tell() % ALIGN))
        written = 0
        for piece in pieces:
            f.write(piece)
            written += len(piece)
        f.write(b"\0" * (-written % ALIGN))
        return written

    def close(self) -> None:
        self.keys.close()


def metadata_bytes(cfg: K2Config, tok_dir: str | Path, name: str, file_type: int, tmp_dir: str | Path) -> int:
    """Bytes of the key/values (architecture keys, tokenizer, chat template) that a first file holds,
    measured by encoding them into a file in `tmp_dir`."""
    path = Path(tmp_dir) / "kv.gguf"
    w = GGUFFileWriter(path)
    try:
        add_metadata(w.keys, cfg, name, file_type)
        add_tokenizer(w.keys, tok_dir, cfg.vocab_size)
        w.keys.write_header_to_file()
        w.keys.write_kv_data_to_file()
    finally:
        w.close()
    return path.stat().st_size - 24  # less magic, version and the two counts


# ---------------------------------------------------------------------------- metadata
def add_metadata(w, cfg: K2Config, name: str, file_type: int) -> None:
    """Every key llama.cpp's deepseek2 loader reads, plus general.* (see reference/gguf-llamacpp.md §2, §6)."""
    import gguf

    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA is written as MQA over the latent
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    r = cfg.rope
    if r.type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(r.factor)
        w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
        # llama.cpp divides this key by 0.1 on load (a legacy quirk its converter keeps)
        w.add_rope_scaling_yarn_log_mul(0.1 * (r.mscale_all_dim or 0.0))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of gpt2-style vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _merge_parts(ranks: dict[bytes, int], token: bytes, rank: int, source: str = "tiktoken.model"
                 ) -> tuple[bytes, bytes]:  # fmt: skip
    """The two tokens BPE merges into `token`: run the merges of lower rank over its bytes."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            break
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise GGUFError(f"{source}: token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def add_tokenizer(w, tok_dir: str | Path, vocab_size: int) -> None:
    """tiktoken.model + tokenizer_config.json -> llama.cpp's gpt2-style vocabulary, pre-tokenizer kimi-k2."""
    import gguf

    from .tokenizer import CONFIG_FILE, TIKTOKEN_FILE, load_tokenizer

    d = Path(tok_dir)
    if not (d / TIKTOKEN_FILE).is_file():
        raise GGUFError(f"{d / TIKTOKEN_FILE}: not found; the GGUF needs the model's tokenizer")
    tok = load_tokenizer(d)
    ranks = tok.encoding._mergeable_ranks
    if tok.vocab_size > vocab_size:
        raise GGUFError(f"{d / TIKTOKEN_FILE}: {tok.vocab_size} tokens, more than the config's vocab_size {vocab_size}")
    enc = _bytes_to_unicode()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        tokens[r] = "".join(enc[c] for c in b)
        types[r] = gguf.TokenType.NORMAL
        if len(b) > 1:
            a, c = _merge_parts(ranks, b, r, str(d / TIKTOKEN_FILE))
            merges.append("".join(enc[x] for x in a) + " " + "".join(enc[x] for x in c))
    specials = tok.encoding._special_tokens
    for s, i in specials.items():
        tokens[i] = s
        types[i] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8")) if (d / CONFIG_FILE).is_file() else {}

    def tid(key: str) -> int | None:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return specials.get(v) if isinstance(v, str) else None

    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):  # fmt: skip
        i = tid(key)
        if i is not None:
            add(i)
    if "<|im_end|>" in specials:
        w.add_eot_token_id(specials["<|im_end|>"])
    w.add_add_bos_token(bool(cfg.get("add_bos_token", False)))
    # the checkpoint's own template when it has one as a string, else K2's (formats/chat.py)
    template = cfg.get("chat_template")
    w.add_chat_template(template if isinstance(template, str) and template else K2_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------- reading
# gguf-py's GGUFReader believes every count and length in a file: a kv_count, an array length or a
# dimension that lies makes it loop, allocate or index for as long as the number says. Every GGUF
# reader here walks the header with check_gguf first, bounded by the file's size, and refuses what
# llama.cpp's gguf.cpp refuses (nested arrays, more than 4 dims, unaligned or out-of-file data).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_GGML_MAX_DIMS = 4
_INT64_MAX = 2**63 - 1


@dataclass
class GGUFHeader:
    """What check_gguf read: the version, scalar and string KVs (arrays: their length), tensor infos."""

    version: int
    kv: dict[str, object]
    tensors: dict[str, tuple[tuple[int, ...], int, int, int]]  # name -> (dims in ggml order, type, offset, nbytes)
    alignment: int
    data_offset: int


def check_gguf(path: str | Path, error: type[K2QuantError] | None = None) -> GGUFHeader:
    """Walk a GGUF file's header, checking every count, length, type and offset against the file, before
    gguf-py reads it. Raises `error` (GGUFError by default) naming the file and what is wrong."""
    from gguf.constants import GGML_QUANT_SIZES

    err = error or GGUFError
    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise err(f"{path}: {size} bytes, too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _walk_gguf(m, size, path, err, sizes)
    except OSError as e:
        raise err(f"{path}: cannot read ({e.strerror or e})") from None


def _walk_gguf(m, size: int, path: Path, err, sizes: dict[int, tuple[int, int]]) -> GGUFHeader:
    pos = 0

    def bad(msg: str) -> K2QuantError:
        return err(f"{path}: {msg}")

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise bad(f"{what} at byte {pos} runs past the end of the file ({size} bytes): truncated")
        v = struct.unpack_from(fmt, m, pos)[0]
        pos += n
        return v

    def text(what: str, decode: bool = True) -> str | None:
        nonlocal pos
        n = take("<Q", f"length of {what}")
        if n > size - pos:
            raise bad(f"{what} at byte {pos - 8} claims {n} bytes, past the end of the file ({size} bytes)")
        pos += n
        if not decode:
            return None
        try:
            return m[pos - n : pos].decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"{what} at byte {pos - n} is not UTF-8") from None

    if m[:4] != b"GGUF":
        raise bad(f"not a GGUF file (magic {bytes(m[:4])!r})")
    pos = 4
    version = take("<I", "version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise bad(f"GGUF version {version}{hint}: k2quant reads versions 2 and 3")
    n_tensors = take("<Q", "tensor count")
    n_kv = take("<Q", "KV count")
    # the least a KV takes is 13 bytes (key length, type, a 1-byte value), a tensor info 24
    if n_kv * 13 + n_tensors * 24 > size - pos:
        raise bad(f"header claims {n_kv} KVs and {n_tensors} tensors, more than the file's {size} bytes can hold")
    kv: dict[str, object] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = text(f"key of KV {i}")
        if key in kv:
            raise bad(f"KV '{key}' appears twice")
        vtype = take("<I", f"type of KV '{key}'")
        if vtype in _GGUF_SCALARS:
            kv[key] = take(_GGUF_SCALARS[vtype], f"value of KV '{key}'")
        elif vtype == _GGUF_STRING:
            kv[key] = text(f"value of KV '{key}'")
        elif vtype == _GGUF_ARRAY:
            itype = take("<I", f"item type of KV '{key}'")
            n = take("<Q", f"length of KV '{key}'")
            if itype in _GGUF_SCALARS:
                nbytes = n * struct.calcsize(_GGUF_SCALARS[itype])
                if nbytes > size - pos:
                    raise bad(f"KV '{key}' claims {n} items, past the end of the file ({size} bytes)")
                pos += nbytes
            elif itype == _GGUF_STRING:
                if n * 8 > size - pos:
                    raise bad(f"KV '{key}' claims {n} strings, past the end of the file ({size} bytes)")
                for j in range(n):
                    text(f"item {j} of KV '{key}'", decode=False)
            elif itype == _GGUF_ARRAY:
                raise bad(f"KV '{key}' is an array of arrays, which GGUF readers do not support")
            else:
                raise bad(f"KV '{key}' has arrays of unknown type {itype}")
            kv[key] = n
        else:
            raise bad(f"KV '{key}' has unknown type {vtype}")
        types[key] = vtype
    alignment = kv.get("general.alignment", 32)
    if "general.alignment" in kv and types["general.alignment"] != _GGUF_UINT32:
        raise bad("general.alignment is not a uint32")
    if alignment == 0 or alignment & (alignment - 1):
        raise bad(f"general.alignment {alignment} is not a power of two")
    infos = []
    for i in range(n_tensors):
        name = text(f"name of tensor {i}")
        n_dims = take("<I", f"dimension count of tensor '{name}'")
        if n_dims > _GGML_MAX_DIMS:
            raise bad(f"tensor '{name}' has {n_dims} dimensions, more than GGUF's {_GGML_MAX_DIMS}")
        dims = tuple(take("<Q", f"dimensions of tensor '{name}'") for _ in range(n_dims))
        ttype = take("<I", f"type of tensor '{name}'")
        offset = take("<Q", f"data offset of tensor '{name}'")
        infos.append((name, dims, ttype, offset))
    data_offset = pos + (-pos % alignment)
    tensors: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
    for name, dims, ttype, offset in infos:
        if name in tensors:
            raise bad(f"tensor '{name}' appears twice")
        if ttype not in sizes:
            raise bad(f"tensor '{name}' has unknown type {ttype}")
        block, type_size = sizes[ttype]
        numel = math.prod(dims)
        if any(d > _INT64_MAX for d in dims) or numel > _INT64_MAX:
            raise bad(f"tensor '{name}' has dimensions {list(dims)}, too large")
        if block > 1 and (not dims or dims[0] % block):
            raise bad(f"tensor '{name}': rows of {dims[0] if dims else 1} values do not fit type {ttype}'s "
                      f"blocks of {block}")  # fmt: skip
        nbytes = numel // block * type_size
        if offset % alignment:
            raise bad(f"tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}")
        if data_offset + offset + nbytes > size:
            raise bad(f"tensor '{name}' data ends at byte {data_offset + offset + nbytes}, past the end of the "
                      f"file ({size} bytes): truncated")  # fmt: skip
        tensors[name] = (dims, ttype, offset, nbytes)
    return GGUFHeader(version, kv, tensors, alignment, data_offset)


def gguf_files(path: str | Path) -> list[Path]:
    """The file(s) of a GGUF model: a .gguf file (the first of a gguf-split set brings the rest)
    or a directory holding one model."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if not found:
            raise GGUFError(f"{p}: no .gguf file")
        firsts = [f for f in found if not _SPLIT_NAME.match(f.name) or _SPLIT_NAME.match(f.name).group(2) == "00001"]
        if len(firsts) != 1:
            raise GGUFError(f"{p}: holds {len(firsts)} GGUF models; name the file")
        p = firsts[0]
    m = _SPLIT_NAME.match(p.name)
    if not m:
        return [p]
    n = int(m.group(3))
    if not 1 <= int(m.group(2)) <= n:
        raise GGUFError(f"{p}: split file {int(m.group(2))} of {n} cannot be")
    files = [p.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for f in files:
        if not f.is_file():
            raise GGUFError(f"{f}: split file missing (the set has {n})")
    return files


def _field(r, key: str, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError) as e:  # a string that is not UTF-8, an array of mixed parts
        raise GGUFError(
            f"{getattr(r.data, 'filename', 'GGUF file')}: metadata key '{key}' cannot be read ({e})"
        ) from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def config_from_gguf(r, source: str) -> K2Config:
    """A K2Config from deepseek2 metadata (llama.cpp's loader defaults where a key is absent)."""
    a = ARCH

    def need(key: str):
        v = _field(r, f"{a}.{key}")
        if v is None:
            raise GGUFError(f"{source}: metadata key '{a}.{key}' missing")
        return v

    arch = _field(r, "general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{source}: general.architecture is {arch!r}, k2quant reads {ARCH!r} (Kimi K2 / DeepSeek-V3)")
    gating = _field(r, f"{a}.expert_gating_func", 1)
    if gating != 2:
        raise GGUFError(f"{source}: expert_gating_func is {gating}, K2 routes with sigmoid (2)")
    rope_dim = need("rope.dimension_count")
    k_mla, v_mla = _field(r, f"{a}.attention.key_length_mla"), _field(r, f"{a}.attention.value_length_mla")
    if not k_mla or not v_mla:
        raise GGUFError(f"{source}: no *_mla key lengths (a legacy attn_kv_b file); convert it again with llama.cpp")
    for key, v in (("rope.dimension_count", rope_dim), ("attention.key_length_mla", k_mla)):
        if not _is_int(v):
            raise GGUFError(f"{source}: metadata key '{a}.{key}' is {v!r}, not an integer")
    n_layer = need("block_count")
    tokens = _field(r, "tokenizer.ggml.tokens", [])
    data = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "vocab_size": _field(r, f"{a}.vocab_size") or (len(tokens) if isinstance(tokens, list) else None),
        "hidden_size": need("embedding_length"), "intermediate_size": need("feed_forward_length"),
        "moe_intermediate_size": need("expert_feed_forward_length"), "num_hidden_layers": n_layer,
        "num_attention_heads": need("attention.head_count"), "num_key_value_heads": need("attention.head_count"),
        "q_lora_rank": _field(r, f"{a}.attention.q_lora_rank"), "kv_lora_rank": need("attention.kv_lora_rank"),
        "qk_nope_head_dim": k_mla - rope_dim, "qk_rope_head_dim": rope_dim, "v_head_dim": v_mla,
        "n_routed_experts": need("expert_count"), "n_shared_experts": need("expert_shared_count"),
        "num_experts_per_tok": need("expert_used_count"), "n_group": _field(r, f"{a}.expert_group_count", 1),
        "topk_group": _field(r, f"{a}.expert_group_used_count", 1),
        "first_k_dense_replace": _field(r, f"{a}.leading_dense_block_count", 0),
        "routed_scaling_factor": _field(r, f"{a}.expert_weights_scale", 1.0) or 1.0,
        "norm_topk_prob": bool(_field(r, f"{a}.expert_weights_norm", False)),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": need("context_length"), "rope_theta": _field(r, f"{a}.rope.freq_base", 10000.0),
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "tie_word_embeddings": False,
    }  # fmt: skip
    if _field(r, f"{a}.rope.scaling.type") == "yarn":
        mscale = _field(r, f"{a}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0
        if not isinstance(mscale, int | float):
            raise GGUFError(
                f"{source}: metadata key '{a}.rope.scaling.yarn_log_multiplier' is {mscale!r}, not a number"
            )
        mscale /= 0.1
        data["rope_scaling"] = {
            "type": "yarn", "factor": need("rope.scaling.factor"),
            "original_max_position_embeddings": need("rope.scaling.original_context_length"),
            "beta_fast": _field(r, f"{a}.rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": _field(r, f"{a}.rope.scaling.yarn_beta_slow", 1.0),
            "mscale": mscale, "mscale_all_dim": mscale,
        }  # fmt: skip
    return K2Config.from_dict(data, source)


@dataclass
class GGUFTensorInfo:
    """Where a checkpoint-named tensor lives in the GGUF files (numel, bytes, type for reports)."""

    name: str
    gguf_name: str
    type: str
    shape: tuple[int, ...]
    stored_bytes: int
    shard: int
    part: str = "plain"  # "plain" | "expert" | "kv_b"
    expert: int | None = None
    format: str = "gguf"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def storage(self) -> str:
        return self.type


@dataclass
class GGUFCheckpoint:
    """A GGUF model opened as a checkpoint: config, tensors under checkpoint names, dequantized on demand."""

    path: Path
    config: K2Config
    shards: list[Path]
    tensors: dict[str, GGUFTensorInfo]
    readers: list = field(default_factory=list, repr=False)
    by_gguf: dict = field(default_factory=dict, repr=False)
    extra: list[str] = field(default_factory=list)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor '{name}' not in the GGUF model") from None

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)

    def _raw(self, gname: str, index: int | None = None) -> tuple[str, torch.Tensor, tuple[int, ...]]:
        """(GGML type, uint8 rows of blocks, shape) of a GGUF tensor, or of one expert of a stacked one."""
        t = self.by_gguf[gname]
        data = np.asarray(t.data)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order
        if index is not None:
            data, shape = data[index], shape[1:]
        rows = math.prod(shape[:-1])
        raw = torch.from_numpy(np.array(data, copy=True).view(np.uint8).reshape(rows, -1))  # mmap is read-only
        return ggml.BY_ID[int(t.tensor_type)].name, raw, shape

    def _decode(self, gname: str, index: int | None = None) -> torch.Tensor:
        tname, raw, shape = self._raw(gname, index)
        return ggml.dequantize(raw, tname, shape[-1]).reshape(shape)

    def stored(self, name: str):
        """The tensor in stored form: ggml rows (`ggml:<TYPE>`, decoded by quant/forms.py); kv_b, which
        llama.cpp stores as two per-head tensors, joined and decoded (`dense`)."""
        from k2quant.checkpoint import StoredWeight

        ti = self.info(name)
        if ti.part == "kv_b":
            return StoredWeight(name, "dense", ti.shape, {"weight": self.tensor(name)})
        tname, raw, _ = self._raw(ti.gguf_name, ti.expert if ti.part == "expert" else None)
        return StoredWeight(name, f"ggml:{tname}", ti.shape, {"data": raw})

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ti = self.info(name)
        if ti.part == "kv_b":
            layer = ti.gguf_name
            w = join_kv_b(self._decode(f"{layer}.attn_k_b.weight"), self._decode(f"{layer}.attn_v_b.weight"))
        elif ti.part == "expert":
            w = self._decode(ti.gguf_name, ti.expert)
        else:
            w = self._decode(ti.gguf_name)
        return w.reshape(ti.shape).to(dtype)


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a deepseek2 GGUF model (one file or a gguf-split set) as a checkpoint."""
    import gguf

    files = gguf_files(path)
    headers = [check_gguf(f) for f in files]
    _check_split(files, headers)
    readers = []
    for f in files:
        try:
            readers.append(gguf.GGUFReader(str(f)))
        except (OSError, ValueError, IndexError, KeyError) as e:
            raise GGUFError(f"{f}: not a readable GGUF file ({e})") from None
    cfg = config_from_gguf(readers[0], str(files[0]))
    by_gguf: dict = {}
    shard_of: dict[str, int] = {}
    for i, r in enumerate(readers):
        for t in r.tensors:
            if int(t.tensor_type) not in ggml.BY_ID:
                raise GGUFError(
                    f"{files[i]}: tensor '{t.name}' has type {t.tensor_type.name}, which k2quant cannot decode"
                )
            if t.name in by_gguf:
                raise GGUFError(f"{files[i]}: tensor '{t.name}' is also in {files[shard_of[t.name]].name}")
            by_gguf[t.name] = t
            shard_of[t.name] = i
    _check_counts(cfg, by_gguf, files[0])
    expected = tensor_map(cfg)
    want = {gt.name: gt.shape for gt in expected}
    tensors: dict[str, GGUFTensorInfo] = {}
    for gt in expected:
        if gt.kind in ("k_b", "v_b"):
            if gt.kind == "v_b":
                continue
            prefix = gt.name.removesuffix(".attn_k_b.weight")
            parts = [f"{prefix}.attn_k_b.weight", f"{prefix}.attn_v_b.weight"]
            if "attn_kv_b.weight" in by_gguf:
                raise GGUFError(f"{files[0]}: legacy attn_kv_b tensors are not supported")
            for p in parts:
                if p not in by_gguf:
                    raise GGUFError(f"{files[0]}: tensor '{p}' missing")
                got = tuple(int(x) for x in reversed(by_gguf[p].shape.tolist()))
                if got != want[p]:
                    raise GGUFError(f"{files[shard_of[p]]}: tensor '{p}' has shape {list(got)}, "
                                    f"the metadata implies {list(want[p])}")  # fmt: skip
            nbytes = sum(int(by_gguf[p].n_bytes) for p in parts)
            H, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
            tensors[gt.sources[0]] = GGUFTensorInfo(gt.sources[0], prefix, _type(by_gguf[parts[0]]),
                                                    (H * (nope + v), cfg.kv_lora_rank), nbytes,
                                                    shard_of[parts[0]], "kv_b")  # fmt: skip
            continue
        t = by_gguf.get(gt.name)
        if t is None:
            if gt.name == "output.weight":  # llama.cpp ties to token_embd when absent
                t = by_gguf.get("token_embd.weight")
            if t is None:
                raise GGUFError(f"{files[0]}: tensor '{gt.name}' missing")
        got = tuple(int(x) for x in reversed(t.shape.tolist()))
        if got != gt.shape:
            raise GGUFError(f"{files[shard_of[t.name]]}: tensor '{t.name}' has shape {list(got)}, "
                            f"the metadata implies {list(gt.shape)}")  # fmt: skip
        if gt.kind == "experts":
            per = int(t.n_bytes) // gt.shape[0]
            for e, src in enumerate(gt.sources):
                tensors[src] = GGUFTensorInfo(src, t.name, _type(t), gt.shape[1:], per, shard_of[t.name], "expert", e)
        else:
            src = gt.sources[0] if gt.name != "output.weight" else "lm_head.weight"
            tensors[src] = GGUFTensorInfo(src, t.name, _type(t), gt.shape, int(t.n_bytes), shard_of[t.name])
    return GGUFCheckpoint(files[0], cfg, files, tensors, readers, by_gguf)


def _check_split(files: list[Path], headers: list[GGUFHeader]) -> None:
    """A gguf-split set's own keys (when present) agree with the files found: split.no, split.count, and
    split.tensors.count, the tensors of all files together."""
    total = sum(len(h.tensors) for h in headers)
    for i, (f, h) in enumerate(zip(files, headers, strict=True)):
        no, count, n_tensors = (h.kv.get(k) for k in ("split.no", "split.count", "split.tensors.count"))
        if count is not None and count != len(files) and not (count in (0, 1) and len(files) == 1):
            raise GGUFError(f"{f}: split.count is {count!r}, but the set has {len(files)} file(s)")
        if no is not None and no != i and len(files) > 1:
            raise GGUFError(f"{f}: split.no is {no!r}, but this is file {i + 1} of the set (split.no {i})")
        if n_tensors is not None and n_tensors != total and len(files) > 1:
            raise GGUFError(f"{f}: split.tensors.count is {n_tensors!r}, but the set's files hold {total} tensors")


def _check_counts(cfg: K2Config, by_gguf: dict, file: Path) -> None:
    """The layer and expert counts the metadata gives, against the tensors there are: tensor_map builds
    names for every (layer, expert), so a count that lies would otherwise cost memory before any check."""
    if cfg.num_hidden_layers > len(by_gguf):
        raise GGUFError(f"{file}: block_count {cfg.num_hidden_layers} is more than the {len(by_gguf)} tensors "
                        "the file holds")  # fmt: skip
    for i in cfg.moe_layers:
        name = f"blk.{i}.ffn_gate_inp.weight"
        t = by_gguf.get(name)
        if t is None:
            raise GGUFError(f"{file}: tensor '{name}' missing")
        got = tuple(int(x) for x in reversed(t.shape.tolist()))
        if got != (cfg.n_routed_experts, cfg.hidden_size):
            raise GGUFError(f"{file}: tensor '{name}' has shape {list(got)}, the metadata implies "
                            f"{[cfg.n_routed_experts, cfg.hidden_size]}")  # fmt: skip


def _type(t) -> str:
    return ggml.BY_ID[int(t.tensor_type)].name


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if p.is_file():
        return p.suffix == ".gguf"
    return p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))
