"""K2Config: the architecture fields k2quant needs, read from config.json.

Kimi K2 ships `model_type: kimi_k2` with the legacy `rope_scaling` dict; transformers
(v5) writes `model_type: deepseek_v3` with `rope_parameters`. Both are read into one
typed object so the forward, the writers and the reports never look at raw JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature term, 0.1 * m * ln(s) + 1 (1 when s <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """RoPE as used on the qk_rope_head_dim part of each head: plain or YaRN."""

    theta: float
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def cos_sin_scale(self) -> float:
        """Factor on cos/sin (transformers' attention_scaling); 1.0 for K2."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor, 1.0)


@dataclass(frozen=True)
class K2Config:
    """Architecture of a Kimi K2 / DeepSeek-V3 model; derived values are properties."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (as transformers)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def dense_layers(self) -> list[int]:
        return list(range(min(self.first_k_dense_replace, self.num_hidden_layers)))

    @property
    def moe_layers(self) -> list[int]:
        return list(range(min(self.first_k_dense_replace, self.num_hidden_layers), self.num_hidden_layers))

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        d["qk_head_dim"] = self.qk_head_dim
        d["softmax_scale"] = self.softmax_scale
        return d

    # ---- reading -------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> K2Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError("config.json", "file not found", str(path))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
            raise ConfigError("config.json", f"not valid JSON ({e})", str(path)) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> K2Config:
        if not isinstance(data, dict):
            raise ConfigError("config.json", "top level must be a JSON object", source)
        r = _FieldReader(data, source)
        model_type = r.get("model_type", str)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                "model_type",
                f"unknown architecture {model_type!r}; k2quant reads {', '.join(SUPPORTED_MODEL_TYPES)}",
                source,
            )
        scoring = data.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError("scoring_func", f"{scoring!r} is not supported (K2 and DeepSeek-V3 use sigmoid)", source)
        topk_method = data.get("topk_method", "noaux_tc")
        if topk_method != "noaux_tc":
            raise ConfigError("topk_method", f"{topk_method!r} is not supported (expected noaux_tc)", source)
        if data.get("moe_layer_freq", 1) != 1:
            raise ConfigError("moe_layer_freq", f"{data['moe_layer_freq']!r} is not supported (expected 1)", source)
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError("hidden_act", f"{act!r} is not supported (expected silu)", source)
        if data.get("attention_bias", False):
            raise ConfigError("attention_bias", "biased attention projections are not supported", source)

        heads = r.get("num_attention_heads", int, positive=True)
        kv_heads = data.get("num_key_value_heads", heads)
        if kv_heads != heads:
            raise ConfigError(
                "num_key_value_heads", f"{kv_heads} != num_attention_heads {heads} (MLA needs equal)", source
            )
        max_pos = r.get("max_position_embeddings", int, positive=True)
        cfg = cls(
            model_type=model_type,
            vocab_size=r.get("vocab_size", int, positive=True),
            hidden_size=r.get("hidden_size", int, positive=True),
            intermediate_size=r.get("intermediate_size", int, positive=True),
            moe_intermediate_size=r.get("moe_intermediate_size", int, positive=True),
            num_hidden_layers=r.get("num_hidden_layers", int, positive=True),
            num_attention_heads=heads,
            q_lora_rank=r.get("q_lora_rank", int, positive=True, optional=True),
            kv_lora_rank=r.get("kv_lora_rank", int, positive=True),
            qk_nope_head_dim=r.get("qk_nope_head_dim", int, positive=True),
            qk_rope_head_dim=r.get("qk_rope_head_dim", int, positive=True),
            v_head_dim=r.get("v_head_dim", int, positive=True),
            n_routed_experts=r.get("n_routed_experts", int, positive=True),
            n_shared_experts=r.get("n_shared_experts", int, default=0),
            num_experts_per_tok=r.get("num_experts_per_tok", int, positive=True),
            n_group=r.get("n_group", int, positive=True, default=1),
            topk_group=r.get("topk_group", int, positive=True, default=1),
            first_k_dense_replace=r.get("first_k_dense_replace", int, default=0),
            routed_scaling_factor=r.get("routed_scaling_factor", float, default=1.0),
            norm_topk_prob=r.get("norm_topk_prob", bool, default=True),
            rms_norm_eps=r.get("rms_norm_eps", float, default=1e-6),
            max_position_embeddings=max_pos,
            rope=_read_rope(data, max_pos, source),
            rope_interleave=r.get("rope_interleave", bool, default=True),
            tie_word_embeddings=r.get("tie_word_embeddings", bool, default=False),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            quantization_config=data.get("quantization_config"),
            raw=dict(data),
        )
        _check_consistency(cfg, source)
        return cfg


class _FieldReader:
    def __init__(self, data: dict[str, Any], source: str | None):
        self.data = data
        self.source = source

    def get(self, name: str, typ: type, *, positive: bool = False, optional: bool = False, default: Any = ...):
        if name not in self.data or self.data[name] is None:
            if optional:
                return None
            if default is not ...:
                return default
            raise ConfigError(name, "missing", self.source)
        value = self.data[name]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(name, f"expected {typ.__name__}, got {value!r}", self.source)
        if positive and value <= 0:
            raise ConfigError(name, f"must be positive, got {value!r}", self.source)
        if typ is int and value < 0:
            raise ConfigError(name, f"must not be negative, got {value!r}", self.source)
        return value


def _read_rope(data: dict[str, Any], max_pos: int, source: str | None) -> RopeConfig:
    """Read RoPE from the newer `rope_parameters` or the legacy `rope_theta` + `rope_scaling`."""
    params = data.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:
        params = data.get("rope_scaling") or {}
        field_name = "rope_scaling"
        if not isinstance(params, dict):
            raise ConfigError(field_name, f"expected an object, got {params!r}", source)
        params = dict(params)
        if "rope_theta" in data:
            params.setdefault("rope_theta", data["rope_theta"])
    if not isinstance(params, dict):
        raise ConfigError(field_name, f"expected an object, got {params!r}", source)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or not theta > 0 or not math.isfinite(theta):
        raise ConfigError(f"{field_name}.rope_theta", f"must be a positive number, got {theta!r}", source)
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type != "yarn":
        raise ConfigError(f"{field_name}.type", f"RoPE type {rope_type!r} is not supported (default or yarn)", source)
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings", data.get("original_max_position_embeddings", max_pos))
    if not isinstance(orig, int) or orig <= 0:
        raise ConfigError(
            f"{field_name}.original_max_position_embeddings", f"must be a positive integer, got {orig!r}", source
        )
    if factor is None:
        factor = max_pos / orig
    if not isinstance(factor, (int, float)) or not factor > 0 or not math.isfinite(factor):
        raise ConfigError(f"{field_name}.factor", f"must be a positive number, got {factor!r}", source)

    def num(key: str, default: float | None) -> float | None:
        v = params.get(key)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{field_name}.{key}", f"expected a number, got {v!r}", source)
        return float(v)

    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=orig,
        # transformers: `get("beta_fast") or 32`, so 0/None fall back to the paper's defaults
        beta_fast=num("beta_fast", None) or 32.0,
        beta_slow=num("beta_slow", None) or 1.0,
        mscale=num("mscale", None),
        mscale_all_dim=num("mscale_all_dim", None),
        attention_factor=num("attention_factor", None),
        truncate=bool(params.get("truncate", True)),
    )


def _check_consistency(c: K2Config, source: str | None) -> None:
    def bad(name: str, msg: str) -> None:
        raise ConfigError(name, msg, source)

    if c.n_routed_experts % c.n_group:
        bad("n_group", f"n_routed_experts {c.n_routed_experts} is not divisible by n_group {c.n_group}")
    if c.topk_group > c.n_group:
        bad("topk_group", f"{c.topk_group} > n_group {c.n_group}")
    per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1 and per_group < 2:
        bad("n_group", f"group-limited routing needs at least 2 experts per group, got {per_group}")
    if c.num_experts_per_tok > c.topk_group * per_group:
        bad(
            "num_experts_per_tok",
            f"{c.num_experts_per_tok} exceeds the {c.topk_group * per_group} experts in the top {c.topk_group} groups",
        )
    if c.first_k_dense_replace > c.num_hidden_layers:
        bad("first_k_dense_replace", f"{c.first_k_dense_replace} > num_hidden_layers {c.num_hidden_layers}")
    if c.qk_rope_head_dim % 2:
        bad("qk_rope_head_dim", f"must be even, got {c.qk_rope_head_dim}")
    if c.rope.type == "yarn" and c.rope.original_max_position_embeddings is None:
        bad("rope_scaling.original_max_position_embeddings", "missing")
    q = c.quantization_config
    if q is not None:
        if not isinstance(q, dict):
            bad("quantization_config", f"expected an object, got {q!r}")
        method = q.get("quant_method")
        if method not in ("fp8", "compressed-tensors"):
            bad("quantization_config.quant_method", f"{method!r} is not supported (fp8 or compressed-tensors)")
        if method == "fp8":
            block = q.get("weight_block_size")
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                bad("quantization_config.weight_block_size", f"expected [rows, cols], got {block!r}")
            if q.get("fmt", "e4m3") != "e4m3":
                bad("quantization_config.fmt", f"{q.get('fmt')!r} is not supported (e4m3)")
        else:
            _check_config_groups(q.get("config_groups") or {}, bad)


def _check_config_groups(groups: Any, bad) -> None:
    """The parts of compressed-tensors' config_groups the checkpoint reader relies on (objects, block shapes)."""
    if not isinstance(groups, dict):
        bad("quantization_config.config_groups", f"expected an object, got {groups!r}")
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if group is not None and not isinstance(group, dict):
            bad(where, f"expected an object, got {group!r}")
        w = (group or {}).get("weights")
        if w is None:
            continue
        if not isinstance(w, dict):
            bad(where + ".weights", f"expected an object, got {w!r}")
        b = w.get("block_structure")
        if b is not None and not (isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b)):
            bad(where + ".weights.block_structure", f"expected [rows, cols], got {b!r}")
