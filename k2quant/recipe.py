"""Recipes: which scheme each tensor gets.

A recipe is a preset (a scheme per component) plus ordered overrides (a regex on the
module name -> a scheme; the last match wins). Per-(layer, expert) overrides are regexes
too. Tensors that are not linears (embeddings, norms, the router) are always kept.
Recipe files are TOML:

    preset = "k2-int4"
    [[override]]
    pattern = 'mlp\\.experts\\.\\d+\\.down_proj$'
    scheme = "int4-g128"
    [[expert]]
    layer = 5
    experts = [3, 7]
    scheme = "fp8-block"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import K2QuantError
from .names import parse_name
from .quant.ggml import ggml_type
from .quant.schemes import Scheme, parse_scheme

LINEAR_COMPONENTS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
PRESETS: dict[str, dict[str, str]] = {
    # what Kimi ships for K2-Thinking: routed experts INT4 g32 symmetric, the rest as in the source
    "k2-int4": {"routed_experts": "int4-g32"},
    # every linear but the router and lm_head
    "int4-all": dict.fromkeys(LINEAR_COMPONENTS, "int4-g32"),
    # every linear but the router and lm_head in FP8 block (vLLM / SGLang W8A8 block kernels)
    "fp8": dict.fromkeys(LINEAR_COMPONENTS, "fp8-block"),
}
# GGUF presets: llama.cpp's file types (the same per-tensor rules as llama-quantize) and k2quant's
# MoE mixes (routed experts low, everything a token always passes through high)
LLAMA_FTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2),
                "q2_k": ("Q2_K", 10), "q3_k_m": ("Q3_K", 12), "q4_k_m": ("Q4_K", 15), "q5_k_m": ("Q5_K", 17),
                "q6_k": ("Q6_K", 18), "iq4_nl": ("IQ4_NL", 25), "iq4_xs": ("IQ4_XS", 30),
                "iq3_m": ("IQ3_S", 27), "iq3_s": ("IQ3_S", 26), "iq3_xs": ("IQ3_S", 22), "iq3_xxs": ("IQ3_XXS", 23),
                "iq2_m": ("IQ2_S", 29), "iq2_s": ("IQ2_XS", 28), "iq2_xs": ("IQ2_XS", 20),
                "iq2_xxs": ("IQ2_XXS", 19), "iq1_m": ("IQ1_M", 31), "iq1_s": ("IQ1_S", 24)}  # fmt: skip
# the 1-2 bit i-quant file types, whose rules llama-quantize keeps apart
_LOW_IQ = ("iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m")
IMATRIX_PRESETS = (*_LOW_IQ, "iq3_xxs", "iq3_xs")  # file types llama-quantize makes only with an imatrix
_Q5K_OUTPUT = (*_LOW_IQ, "iq3_xxs")  # file types whose output tensor is Q5_K (the others: Q6_K)
K2_GGUF_MIXES = {  # experts gate/up, experts down, everything else (attention, shared, dense, embeddings), file type
    "k2-q4": ("Q4_K", "Q5_K", "Q8_0", 15),
    "k2-q3": ("Q3_K", "Q4_K", "Q6_K", 12),
    "k2-q2": ("Q2_K", "Q3_K", "Q6_K", 10),
}
GGUF_PRESETS = [*LLAMA_FTYPES, *K2_GGUF_MIXES]


class RecipeError(K2QuantError):
    pass


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama-quantize's use_more_bits: the first and last eighth of the layers and every third between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def gguf_preset_type(preset: str, name: str, layer: int | None, n_layer: int, has_imatrix: bool = False,
                     ffn_down_index: int = 0, ncols: int = 0) -> str:  # fmt: skip
    """The GGML type a GGUF preset gives a quantizable tensor (before the row-width fallback);
    llama-quantize's llama_tensor_get_type for deepseek2 (more than 8 experts, MLA's split
    attn_k_b / attn_v_b, which are no attn_v). Some rules hold only without an imatrix; the
    low i-quants' ffn_down rule counts ffn_down tensors in file order (`ffn_down_index`: how many
    came before this one), not layers. `ncols`: the row width (`output` is Q8_0 when the file
    type's blocks do not divide it). The rules for exactly 8 experts are not modelled (K2 has 384)."""
    if preset in K2_GGUF_MIXES:
        low, down, high, _ = K2_GGUF_MIXES[preset]
        if name == "output.weight":
            return "Q6_K" if high != "Q8_0" else "Q8_0"
        if "_exps" in name:
            return down if "ffn_down" in name else low
        return high
    base = LLAMA_FTYPES[preset][0]
    if base in ("F32", "F16", "BF16"):
        return base
    if name == "output.weight":
        if base == "Q8_0" or (ncols and ncols % ggml_type(base).block):
            return "Q8_0"
        return "Q5_K" if preset in _Q5K_OUTPUT else "Q6_K"
    if name == "token_embd.weight":
        if preset in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
            return "Q2_K"
        return "IQ3_S" if preset in ("iq2_s", "iq2_m", "iq3_xxs") else base
    if preset in _LOW_IQ:
        up = "IQ3_S" if preset in ("iq2_s", "iq2_m") else "Q2_K"
        if "ffn_down" in name and ffn_down_index < n_layer // 8:
            return up
        if "attn_output" in name and preset in ("iq2_s", "iq2_m", "iq1_s", "iq1_m"):
            return "IQ2_XXS" if preset in ("iq1_s", "iq1_m") else up
        return base
    if preset == "iq3_xs" and ("ffn_gate" in name or "ffn_up" in name) and layer is not None:
        return "IQ3_XXS" if n_layer // 8 <= layer < 7 * n_layer // 8 else base
    if "ffn_down" in name and layer is not None:
        if preset == "iq3_xxs" and not has_imatrix:
            return "Q4_K" if layer < n_layer // 8 else "Q3_K"
        if preset == "iq3_m" and layer < n_layer // 8:
            return "Q4_K"
        if preset == "q2_k":
            return "Q3_K"
        if preset == "q3_k_m":
            return "Q5_K" if layer < n_layer // 16 else "Q4_K"
        if preset in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layer):
            return "Q6_K"
        if preset in ("iq4_nl", "iq4_xs") and not has_imatrix and layer < n_layer // 8:
            return "Q5_K"
        if preset == "q4_0" and has_imatrix and layer < n_layer // 8:
            return "Q4_1"  # llama-quantize's guard for the first ffn_down layers, with an imatrix only
    if "attn_output" in name:
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "iq3_xxs": "IQ3_S", "iq3_m": "Q4_K"}.get(preset, base)
    return base


@dataclass
class Recipe:
    preset: str
    overrides: list[tuple[re.Pattern, Scheme | str]] = field(default_factory=list)
    target: str = "safetensors"
    source: str = ""  # the recipe file, named in errors

    def gguf_type(self, name: str, modules: list[str], layer: int | None, n_layer: int,
                  has_imatrix: bool = False, ffn_down_index: int = 0, ncols: int = 0) -> str:  # fmt: skip
        """GGML type of a GGUF tensor (`name`, made of checkpoint `modules`): the preset's rule,
        then overrides matching a module name or the GGUF name. Stacked experts share one type."""
        base = gguf_preset_type(self.preset, name, layer, n_layer, has_imatrix, ffn_down_index, ncols)
        chosen = set()
        for mod in modules:
            t = base
            for pattern, typ in self.overrides:
                if pattern.search(mod) or pattern.search(name):
                    t = typ
            chosen.add(t)
        if len(chosen) > 1:
            where = f"{self.source}: " if self.source else ""
            raise RecipeError(f"{where}tensor '{name}': its experts resolve to {', '.join(sorted(chosen))}; a GGUF "
                              "tensor stacks a layer's experts in one type, so override whole layers")  # fmt: skip
        return chosen.pop()

    def scheme_for(self, name: str) -> Scheme:
        """The scheme for a logical tensor name (`...q_a_proj.weight`)."""
        ni = parse_name(name)
        if not ni.is_linear:
            return parse_scheme("keep")
        module = name.removesuffix(".weight")
        chosen = PRESETS[self.preset].get(ni.component, "keep")
        result = parse_scheme(chosen)
        for pattern, scheme in self.overrides:
            if pattern.search(module):
                result = scheme
        return result

    def describe(self) -> dict:
        return {"preset": self.preset, "target": self.target,
                "overrides": [[p.pattern, s if isinstance(s, str) else s.name] for p, s in self.overrides]}  # fmt: skip


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def expert_pattern(layer: int, experts: list[int]) -> str:
    ids = "|".join(str(e) for e in sorted(set(experts)))
    return rf"^model\.layers\.{layer}\.mlp\.experts\.({ids})\.(gate_proj|up_proj|down_proj)$"


def build_recipe(
    preset: str | None, recipe_file: str | Path | None = None, overrides: list[str] = (), target: str = "safetensors"
) -> Recipe:
    """Preset, then the recipe file's overrides, then command-line PATTERN=SCHEME overrides.

    target "gguf": presets are GGUF_PRESETS and schemes are GGML type names (q4_k, q8_0, ...)."""
    pairs: list[tuple[str, str, str]] = []  # (pattern, scheme, where)
    if recipe_file is not None:
        path = Path(recipe_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, TOMLDecodeError
            raise RecipeError(f"{path}: cannot read recipe ({e})") from None
        preset = preset or data.get("preset")
        source = str(path)
        for key in ("override", "expert"):
            if not isinstance(data.get(key, []), list):
                raise RecipeError(f"{path}: '{key}' must be an array of tables ([[{key}]])")
        for i, o in enumerate(data.get("override", [])):
            if not isinstance(o, dict) or not isinstance(o.get("pattern"), str) or not isinstance(o.get("scheme"), str):
                raise RecipeError(f"{path}: override #{i + 1} needs 'pattern' and 'scheme' (strings)")
            pairs.append((o["pattern"], o["scheme"], f"{path}: override #{i + 1}"))
        for i, e in enumerate(data.get("expert", [])):
            ok = isinstance(e, dict) and _is_count(e.get("layer")) and isinstance(e.get("experts"), list)
            if not (ok and all(_is_count(x) for x in e["experts"]) and isinstance(e.get("scheme"), str)):
                raise RecipeError(f"{path}: expert #{i + 1} needs 'layer', 'experts' (a list of expert numbers) and "
                                  "'scheme'")  # fmt: skip
            pairs.append((expert_pattern(e["layer"], e["experts"]), e["scheme"], f"{path}: expert #{i + 1}"))
    for o in overrides:
        pat, sep, scheme = o.rpartition("=")
        if not sep or not pat:
            raise RecipeError(f"--override {o!r}: expected PATTERN=SCHEME")
        pairs.append((pat, scheme, f"--override {o!r}"))
    where_preset = f"{recipe_file}: " if recipe_file is not None else ""
    if preset is None:
        raise RecipeError(f"{where_preset}no preset: pass --preset or set preset in the recipe file")
    presets = GGUF_PRESETS if target == "gguf" else list(PRESETS)
    if preset not in presets:
        raise RecipeError(f"{where_preset}unknown preset {preset!r} for --to {target}; presets: {', '.join(presets)}")
    compiled = []
    for pat, scheme, where in pairs:
        try:
            value = ggml_type(scheme).name if target == "gguf" else parse_scheme(scheme)
            compiled.append((re.compile(pat), value))
        except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}, ((((... 2000 deep
            raise RecipeError(f"{where}: bad pattern {pat!r} ({e})") from None
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    return Recipe(preset, compiled, target, source if recipe_file is not None else "")
