"""compressed-tensors output: the quantization_config that vLLM, SGLang and transformers read.

Tensors themselves are written by SafetensorsWriter with compressed-tensors' names
(`weight_packed` / `weight_scale` / `weight_shape` [/ `weight_zero_point`] for
pack-quantized INT4, `weight` / `weight_scale` for float-quantized FP8). When one
quantized scheme covers every quantized linear, the config takes the exact form Kimi
ships for K2-Thinking (targets ["Linear"] plus an ignore list); with several schemes each
config group targets its modules by regex (a whole family such as every routed expert's
down_proj) or by exact name.
"""

from __future__ import annotations

import re
from collections import defaultdict

_NUM = re.compile(r"\.\d+\.")


def _family(module: str) -> str:
    """model.layers.7.mlp.experts.12.up_proj -> model.layers.#.mlp.experts.#.up_proj"""
    prev = None
    while prev != module:
        prev, module = module, _NUM.sub(".#.", module)
    return module


def _family_regex(family: str) -> str:
    return "re:^" + re.escape(family).replace("\\#", "#").replace("#", r"\d+") + "$"


def compact_targets(modules: list[str], all_linears: list[str]) -> list[str]:
    """Regexes for whole families covered by `modules`, exact names for the rest."""
    chosen = set(modules)
    by_family: dict[str, list[str]] = defaultdict(list)
    for m in all_linears:
        by_family[_family(m)].append(m)
    targets = []
    for fam in sorted(by_family):
        members = by_family[fam]
        inside = [m for m in members if m in chosen]
        if not inside:
            continue
        # transformers picks the MoE experts' config group as the one with an `re:` target that
        # mentions "experts": shared experts are therefore named exactly, never by regex
        if len(inside) == len(members) and len(members) > 1 and "shared_experts" not in fam:
            targets.append(_family_regex(fam))
        else:
            targets.extend(inside)
    return targets


def quantization_config(schemes: dict[str, object], assignment: dict[str, str], all_linears: list[str]) -> dict:
    """`assignment`: linear module name -> scheme name ('keep'/'bf16' for unquantized); `schemes`: name -> Scheme."""
    quantized = sorted({s for s in assignment.values() if schemes[s].ct_format})
    ignore_modules = [m for m in all_linears if not schemes[assignment[m]].ct_format]
    ignore = ["lm_head"] + compact_targets(ignore_modules, all_linears)
    groups = {}
    for i, name in enumerate(quantized):
        s = schemes[name]
        mods = [m for m in all_linears if assignment[m] == name]
        targets = ["Linear"] if len(quantized) == 1 else compact_targets(mods, all_linears)
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": s.ct_weights(),
            "input_activations": s.ct_input_activations(),
            "output_activations": None,
            "format": s.ct_format,
        }
    formats = {schemes[n].ct_format for n in quantized}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
