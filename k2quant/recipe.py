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


class RecipeError(K2QuantError):
    pass


@dataclass
class Recipe:
    preset: str
    overrides: list[tuple[re.Pattern, Scheme]] = field(default_factory=list)

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
        return {"preset": self.preset, "overrides": [[p.pattern, s.name] for p, s in self.overrides]}


def expert_pattern(layer: int, experts: list[int]) -> str:
    ids = "|".join(str(e) for e in sorted(set(experts)))
    return rf"^model\.layers\.{layer}\.mlp\.experts\.({ids})\.(gate_proj|up_proj|down_proj)$"


def build_recipe(preset: str | None, recipe_file: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Preset, then the recipe file's overrides, then command-line PATTERN=SCHEME overrides."""
    pairs: list[tuple[str, str, str]] = []  # (pattern, scheme, where)
    if recipe_file is not None:
        path = Path(recipe_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise RecipeError(f"{path}: cannot read recipe ({e})") from None
        preset = preset or data.get("preset")
        for i, o in enumerate(data.get("override", [])):
            if not isinstance(o, dict) or "pattern" not in o or "scheme" not in o:
                raise RecipeError(f"{path}: override #{i + 1} needs 'pattern' and 'scheme'")
            pairs.append((o["pattern"], o["scheme"], f"{path}: override #{i + 1}"))
        for i, e in enumerate(data.get("expert", [])):
            try:
                pat = expert_pattern(int(e["layer"]), [int(x) for x in e["experts"]])
                pairs.append((pat, e["scheme"], f"{path}: expert #{i + 1}"))
            except (KeyError, TypeError, ValueError):
                raise RecipeError(f"{path}: expert #{i + 1} needs 'layer', 'experts' (a list) and 'scheme'") from None
    for o in overrides:
        pat, sep, scheme = o.rpartition("=")
        if not sep or not pat:
            raise RecipeError(f"--override {o!r}: expected PATTERN=SCHEME")
        pairs.append((pat, scheme, f"--override {o!r}"))
    if preset is None:
        raise RecipeError("no preset: pass --preset or set preset in the recipe file")
    if preset not in PRESETS:
        raise RecipeError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    compiled = []
    for pat, scheme, where in pairs:
        try:
            compiled.append((re.compile(pat), parse_scheme(scheme)))
        except re.error as e:
            raise RecipeError(f"{where}: bad pattern {pat!r} ({e})") from None
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    return Recipe(preset, compiled)
