"""Where each weight lives: a pure function of the model's inventory, hotness and a GPU budget.

`place(inventory, config, gpu_budget, hotness)` fills the GPU in a fixed order and leaves
the rest in RAM:

1. norms, 2. the router (gate weight and correction bias), 3. attention, 4. shared experts,
5. the dense MLP layers, 6. lm_head; the embedding table stays in RAM (one row per token is
read); then 7. routed experts by hotness, hottest (layer, expert) first, ties by layer then
expert id, until the budget is full. A class that does not fit whole is placed tensor by
tensor in that order, so the budget is never exceeded. Without hotness no routed expert is
placed (dynamic placement fills the GPU as the session routes).

`reads_per_token(placement, names, config, frequency)` says how one decoded token reads each
tensor (its tier, and how many times whole): every dense tensor once (one embedding row), and
per MoE layer `num_experts_per_tok` experts, weighted by how often each is routed;
`bytes_per_token` sums it over the inventory per tier (k2quant plan weights it per kernel).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from k2quant.config import K2Config
from k2quant.errors import K2QuantError
from k2quant.names import parse_name

ORDER = ("norms", "router", "attention", "shared_experts", "dense_mlp", "lm_head")


@dataclass
class Placement:
    gpu_budget: int
    gpu: set[str] = field(default_factory=set)  # dense (non-routed) tensor names on the GPU
    gpu_experts: dict[int, set[int]] = field(default_factory=dict)  # MoE layer -> routed experts on the GPU
    gpu_bytes: int = 0
    cpu_bytes: int = 0

    def expert_on_gpu(self, layer: int, expert: int) -> bool:
        return expert in self.gpu_experts.get(layer, ())

    def summary(self) -> dict:
        n = sum(len(v) for v in self.gpu_experts.values())
        return {"gpu_budget": self.gpu_budget, "gpu_bytes": self.gpu_bytes, "cpu_bytes": self.cpu_bytes,
                "gpu_dense_tensors": len(self.gpu), "gpu_routed_experts": n}  # fmt: skip


def tensor_class(name: str) -> str:
    """One of ORDER, 'embeddings' or 'routed_experts' for a checkpoint tensor name."""
    ni = parse_name(name)
    if ni.component == "norms":
        return "norms"
    if ni.component == "router":
        return "router"
    if ni.component == "embeddings":
        return "lm_head" if name.startswith("lm_head") else "embeddings"
    return ni.component  # attention, shared_experts, dense_mlp, routed_experts


def expert_bytes(inventory: dict[str, int], layer: int, expert: int) -> int:
    p = f"model.layers.{layer}.mlp.experts.{expert}."
    return sum(inventory[p + f"{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj"))


def place(inventory: dict[str, int], config: K2Config, gpu_budget: int,
          hotness: dict[int, list[float]] | None = None) -> Placement:  # fmt: skip
    """inventory: stored bytes per logical tensor name; hotness: MoE layer -> routing frequency per expert."""
    pl = Placement(gpu_budget)
    by_class: dict[str, list[str]] = {}
    for name in inventory:
        by_class.setdefault(tensor_class(name), []).append(name)
    free = gpu_budget
    for cls in ORDER:
        for name in by_class.get(cls, []):
            if inventory[name] <= free:
                pl.gpu.add(name)
                free -= inventory[name]
    if hotness:
        ranked = sorted(((-f, layer, e) for layer, freqs in hotness.items() for e, f in enumerate(freqs)))
        for _, layer, e in ranked:
            nb = expert_bytes(inventory, layer, e)
            if nb <= free:
                pl.gpu_experts.setdefault(layer, set()).add(e)
                free -= nb
    pl.gpu_bytes = gpu_budget - free
    pl.cpu_bytes = sum(inventory.values()) - pl.gpu_bytes
    return pl


def reads_per_token(pl: Placement, names, config: K2Config,
                    frequency: dict[int, list[float]] | None = None) -> dict[str, tuple[str, float]]:  # fmt: skip
    """How one decoded token reads each tensor: (tier "gpu" | "cpu", how many times it reads the whole
    tensor): every dense tensor once, one embedding row (1 / vocab), a routed expert's tensors k times
    its share of the layer's routed (token, expert) pairs.

    frequency: per MoE layer, each expert's share of those pairs (sums to 1); uniform when not given."""
    k, n = config.num_experts_per_tok, config.n_routed_experts
    out = {}
    for name in names:
        cls = tensor_class(name)
        if cls == "routed_experts":
            ni = parse_name(name)
            freq = (frequency or {}).get(ni.layer)
            share = freq[ni.expert] if freq else 1.0 / n
            out[name] = ("gpu" if pl.expert_on_gpu(ni.layer, ni.expert) else "cpu", k * share)
        else:
            out[name] = ("gpu" if name in pl.gpu else "cpu", 1.0 / config.vocab_size if cls == "embeddings" else 1.0)
    return out


def bytes_per_token(pl: Placement, inventory: dict[str, int], config: K2Config,
                    frequency: dict[int, list[float]] | None = None) -> dict[str, float]:  # fmt: skip
    """Bytes one decoded token reads from each tier ({"gpu": ..., "cpu": ...}), by `reads_per_token`."""
    out = {"gpu": 0.0, "cpu": 0.0}
    for name, (tier, reads) in reads_per_token(pl, inventory, config, frequency).items():
        out[tier] += reads * inventory[name]
    return out


def read_hotness(data: dict) -> dict[int, list[float]]:
    """calibrate's hotness.json ({"<layer>": {"frequency": [...], ...}}) as layer -> frequencies.
    Raises ValueError on anything else (load_hotness names the file)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object of layers, got a {type(data).__name__}")
    out = {}
    for key, entry in data.items():
        freq = entry.get("frequency") if isinstance(entry, dict) else None
        if not isinstance(freq, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in freq):
            raise ValueError(f"hotness layer {key!r}: expected an object with a list of numbers under 'frequency'")
        # float() of a huge int overflows; a NaN or negative share would order the experts at random
        if not all(0 <= v <= 2**53 for v in freq):
            raise ValueError(f"hotness layer {key!r}: frequencies must be finite and not negative")
        if not re.fullmatch(r"[0-9]{1,6}", key):
            raise ValueError(f"hotness layer {key!r} is not a layer number")
        out[int(key)] = [float(v) for v in freq]
    return out


def load_hotness(path: str | Path, error: type[K2QuantError] = K2QuantError) -> dict[int, list[float]]:
    """read_hotness of a hotness.json file; anything wrong with it is `error` naming the file."""
    try:
        return read_hotness(json.loads(Path(path).read_text(encoding="utf-8")))
    except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, not a hotness table
        raise error(f"{path}: not a hotness.json ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
