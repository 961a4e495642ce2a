"""Layer-streamed calibration statistics: importance (imatrix) per linear and per expert, expert hotness.

All calibration tokens go through one layer before the next. The attention half runs per
batch of sequences (it mixes positions); the MLP / MoE half runs once over every token,
so each routed expert's weights are read once per layer and see all of their tokens
together. Kept in memory: the hidden states (tokens x hidden) and one layer's
non-expert weights; routed experts are read one at a time.

Balanced coverage: an expert routed fewer than `min_expert_tokens` tokens also sees the
tokens that score highest for it among those not routed to it. Those extra rows feed its
statistics only; the layer's output, and so the next layer's input, is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from k2quant.model import Done, ExpertFn, K2Model, Pending, RoutedExperts


class LayerSink(Protocol):
    """Consumes statistics layer by layer during collection (layer-streamed GPTQ)."""

    layers: set[int]
    propagate: bool  # after layer_done, rerun the layer (its weights now quantized) to make the next layer's input

    def expert_done(self, stats: CalibStats, layer: int, expert: int) -> None: ...

    def layer_done(self, stats: CalibStats, layer: int) -> None: ...


@dataclass
class CalibStats:
    in_sum2: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> sum of x^2 per input channel (f64)
    counts: dict[str, int] = field(default_factory=dict)  # module -> activation rows
    routed: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> tokens routed per expert
    weight_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> sum of routing weights
    topped_up: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> extra tokens per expert
    tokens: int = 0
    hessians: dict[str, torch.Tensor] | None = None  # module -> X^T X (f64) when collected for GPTQ
    hessian_for: set[str] | None = None  # the modules whose Hessians are wanted (None: all)
    peak_hessian_bytes: int = 0  # most Hessian memory held at once
    _last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its X^T X): gate/up, q_a/kv_a share inputs

    def observe(self, module: str, x: torch.Tensor) -> None:
        if x.dim() == 4:  # per-head inputs [b, H, t, d] (attn_k_b / attn_v_b): sums per head, no Hessian
            s = x.double().pow(2).sum((0, 2))
            self.in_sum2[module] = self.in_sum2[module] + s if module in self.in_sum2 else s
            self.counts[module] = self.counts.get(module, 0) + x.shape[0] * x.shape[2]
            return
        rows = x.reshape(-1, x.shape[-1])
        s = rows.double().pow(2).sum(0)
        if module in self.in_sum2:
            self.in_sum2[module] += s
        else:
            self.in_sum2[module] = s
        self.counts[module] = self.counts.get(module, 0) + rows.shape[0]
        if self.hessians is not None and (self.hessian_for is None or module in self.hessian_for):
            if self._last is not None and self._last[0] is x:
                h = self._last[1]
            else:
                h = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
                for i in range(0, rows.shape[0], 4096):  # chunked: never more than 4096 rows in f64 at once
                    r = rows[i : i + 4096].double()
                    h.addmm_(r.T, r)
                self._last = (x, h)
            self.hessians[module] = self.hessians[module] + h if module in self.hessians else h
            held = sum({id(v): v.nbytes for v in [*self.hessians.values(), h]}.values())
            self.peak_hessian_bytes = max(self.peak_hessian_bytes, held)

    def hotness(self) -> dict:
        out = {}
        for layer in sorted(self.routed):
            n = self.routed[layer]
            out[str(layer)] = {
                "routed_tokens": n.tolist(),
                "frequency": (n / n.sum().clamp(min=1)).tolist(),
                "mean_weight": (self.weight_sum[layer] / n.clamp(min=1)).tolist(),
                "topped_up_tokens": self.topped_up[layer].tolist(),
            }
        return out


@dataclass
class Resumed:
    """Where an interrupted collection picks up (calib/resume.py reads it from disk): the layers done,
    the hidden states after the last of them, and the statistics collected so far."""

    layers_done: int
    hidden: list[torch.Tensor]
    stats: CalibStats


class CoverageExperts(RoutedExperts):
    """Calibration's routed-experts seam: each expert also runs on `extra(layer, scores, ids)[e]`
    (tokens not routed to it, so observers see more of its inputs; those outputs are dropped),
    and `done(layer, e)` is called once expert e has seen all of its tokens (streamed GPTQ)."""

    def __init__(self, extra: Callable[[int, torch.Tensor, torch.Tensor], dict[int, torch.Tensor]] | None,
                 done: Callable[[int, int], None] | None):  # fmt: skip
        self.extra = extra
        self.done = done

    def submit(self, layer: int, x: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               expert: ExpertFn) -> Pending:  # fmt: skip
        out = torch.zeros_like(x)
        extra = self.extra(layer, scores, ids) if self.extra is not None else {}
        for e in sorted(set(torch.unique(ids).tolist()) | set(extra)):
            tok, slot = torch.where(ids == e)
            if e in extra:  # seen by observers only: the layer's output does not change
                expert(e, x[extra[e]])
            if tok.numel():
                out.index_add_(0, tok, expert(e, x[tok]) * weights[tok, slot, None].to(x.dtype))
            if self.done is not None:
                self.done(layer, e)
        return Done(out)


def collect(
    model: K2Model,
    sequences: torch.Tensor,
    batch: int = 8,
    min_expert_tokens: int = 0,
    progress: bool = True,
    hessian: bool | set[str] = False,
    sink: LayerSink | None = None,
    resumed: Resumed | None = None,
    layer_done: Callable[[int, list[torch.Tensor], CalibStats], None] | None = None,
) -> CalibStats:
    """Statistics for every linear (per expert for routed experts) over `sequences` [N, T];
    with `hessian`, also X^T X per linear for GPTQ (in_features^2 doubles each; a set: for those modules).

    With a `sink`, only the layers in `sink.layers` are observed (the others are just run,
    and nothing runs past the last of them), and the sink is handed the statistics as each
    routed expert and each layer completes, so it can consume and drop them.

    Resumable (calib/resume.py): `layer_done(layer, hidden, stats)` is called after each layer
    with the hidden states after it; `resumed` (the layers done, those hidden states, the
    statistics so far) starts at the next layer instead of the embedding."""
    c = model.config
    if resumed is not None and sink is not None:
        raise ValueError("a layer sink (streamed GPTQ) cannot resume from a calibration state")
    hessian_for = hessian if isinstance(hessian, set) else None
    if resumed is None:
        first = 0
        stats = CalibStats(tokens=sequences.numel(), hessians={} if hessian else None, hessian_for=hessian_for)
    else:
        first, hs, stats = resumed.layers_done, resumed.hidden, resumed.stats
        if stats.tokens != sequences.numel():
            raise ValueError(f"resumed statistics cover {stats.tokens} tokens, the sequences {sequences.numel()}")
        stats.hessian_for = hessian_for
        stats.hessians = (stats.hessians or {}) if hessian else None
    observer = lambda name, x: stats.observe(name, x) if name != "lm_head" else None  # noqa: E731

    def on_route(layer, scores, ids, weights):
        e = c.n_routed_experts
        stats.routed[layer] = stats.routed.get(layer, 0) + torch.bincount(ids.flatten(), minlength=e)
        ws = torch.zeros(e, dtype=torch.float64).index_add_(0, ids.flatten(), weights.flatten().double())
        stats.weight_sum[layer] = stats.weight_sum.get(layer, 0) + ws

    def coverage(layer, scores, ids):
        counts = torch.bincount(ids.flatten(), minlength=c.n_routed_experts)
        extra = {}
        topped = torch.zeros(c.n_routed_experts, dtype=torch.long)
        for e in torch.nonzero(counts < min_expert_tokens).flatten().tolist():
            s = scores[:, e].clone()
            s[(ids == e).any(-1)] = float("-inf")  # only tokens not routed to e
            need = min(min_expert_tokens - int(counts[e]), int(torch.isfinite(s).sum()))
            if need > 0:
                extra[e] = s.topk(need).indices.sort().values
                topped[e] = need
        stats.topped_up[layer] = topped
        return extra

    weights = model.weights
    weights.cache = lambda name: ".mlp.experts." not in name  # one layer's non-expert weights, never the experts
    pos = torch.arange(sequences.shape[1])
    if resumed is None:
        hs = [model.embed(sequences[i : i + batch]) for i in range(0, sequences.shape[0], batch)]
    last = c.num_hidden_layers - 1 if sink is None else max(sink.layers, default=-1)
    bar = tqdm(range(first, last + 1), desc="calibrating", unit="layer", disable=not progress, initial=first,
               total=last + 1)  # fmt: skip
    with torch.no_grad():
        for layer in bar:
            watch = sink is None or layer in sink.layers
            model.observer = observer if watch else None
            model.route_observer = on_route if watch else None
            model.routed = CoverageExperts(
                coverage if watch and min_expert_tokens > 0 else None,
                (lambda i, e: sink.expert_done(stats, i, e)) if sink and watch else None,
            )
            rerun = sink is not None and sink.propagate and watch
            inputs = list(hs) if rerun else None  # kept only to run the layer again: twice the hidden states
            hs = _layer_forward(model, layer, hs, pos, stats)
            weights.release(f"model.layers.{layer}.")
            stats._last = None
            if sink is not None and watch:
                sink.layer_done(stats, layer)
            if rerun:  # again, with the weights now quantized, observed by no one
                model.observer = model.route_observer = None
                model.routed = RoutedExperts()
                hs = _layer_forward(model, layer, inputs, pos, stats)
                weights.release(f"model.layers.{layer}.")
            del inputs
            if layer_done is not None:
                layer_done(layer, hs, stats)
    model.observer = model.route_observer = None
    model.routed = RoutedExperts()
    return stats


def _layer_forward(model: K2Model, layer: int, hs: list[torch.Tensor], pos: torch.Tensor,
                   stats: CalibStats) -> list[torch.Tensor]:  # fmt: skip
    """One decoder layer over every batch: attention per batch, the MLP / MoE half over all tokens at once.
    Consumes `hs` (emptied batch by batch), so a layer's inputs are freed as its outputs are made."""
    c = model.config
    hs = [model.attention_block(layer, hs.pop(0), pos) for _ in range(len(hs))]
    shapes = [h.shape for h in hs]
    flat = torch.cat([h.reshape(-1, c.hidden_size) for h in hs])
    if c.is_moe(layer):
        out = model.ffn_block(layer, flat)
        if layer not in stats.topped_up:
            stats.topped_up[layer] = torch.zeros(c.n_routed_experts, dtype=torch.long)
    else:  # dense: chunked by tokens, its weights stay cached for the layer
        out = torch.cat([model.ffn_block(layer, flat[i : i + 4096]) for i in range(0, len(flat), 4096)])
    return [h.view(s) for h, s in zip(out.split([s[0] * s[1] for s in shapes]), shapes, strict=True)]


def coverage_report(stats: CalibStats, min_expert_tokens: int) -> dict:
    """Per MoE layer: experts below the threshold before top-up, and the fewest tokens any expert saw."""
    rep = {}
    for layer, n in sorted(stats.routed.items()):
        up = stats.topped_up.get(layer, torch.zeros_like(n))
        rep[str(layer)] = {
            "experts_below_min": int((n < min_expert_tokens).sum()) if min_expert_tokens else 0,
            "min_routed": int(n.min()),
            "min_after_top_up": int((n + up).min()),
            "never_routed": int((n == 0).sum()),
        }
    return rep
