"""Routed experts' packed weights on two tiers, and moving them between tiers while decoding.

Every routed expert has a kernel on the slow tier (RAM, computed on the CPU): the packed
weights once, repacked at load for the CPU kernel. Experts placed on the fast tier (the
GPU) get a second kernel there, built from the stored form in the checkpoint. With
`dynamic`, the store counts how often this session routes each (layer, expert), decays
the counts after every step, and between steps promotes the hottest slow-tier experts of a
layer into free fast-tier bytes, or in place of that layer's coldest fast-tier expert when
it is clearly hotter (per layer, frequency-aware: one global LRU smaller than a token's
working set cycles to no hits). Promotions are built on a background thread (on CUDA on a
side stream) and installed at the start of a later step, so decode never waits for a copy.

Both tiers may be the same device (tests run them both on the CPU): what goes where, the
hit counts and the bytes read per tier do not depend on the devices.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .kernels import ExpertKernels, make_expert


@dataclass
class TierStats:
    pairs: dict[str, int] = field(default_factory=lambda: {"fast": 0, "slow": 0})  # (token, expert) pairs
    bytes: dict[str, int] = field(default_factory=lambda: {"fast": 0, "slow": 0})  # expert weight bytes read
    promotions: int = 0
    evictions: int = 0

    def fast_share(self) -> dict[str, float]:
        p, b = self.pairs, self.bytes
        return {"pairs": p["fast"] / max(1, p["fast"] + p["slow"]), "bytes": b["fast"] / max(1, b["fast"] + b["slow"])}


class ExpertStore:
    def __init__(self, checkpoint, mode: str, slow_device: torch.device, fast_device: torch.device | None,
                 fast_budget: int, placed: dict[int, set[int]], dynamic: bool = False, decay: float = 0.95,
                 margin: float = 1.5, max_moves: int = 2, progress=None):  # fmt: skip
        self.checkpoint, self.mode = checkpoint, mode
        self.config = checkpoint.config
        self.slow_device, self.fast_device = slow_device, fast_device
        self.fast_budget = fast_budget if fast_device is not None else 0
        self.dynamic = dynamic and fast_device is not None
        self.decay, self.margin, self.max_moves = decay, margin, max_moves
        self.slow: dict[tuple[int, int], ExpertKernels] = {}
        self.fast: dict[tuple[int, int], ExpertKernels] = {}
        self.nbytes: dict[tuple[int, int], int] = {}  # stored bytes of each expert (what a use reads)
        self.score: dict[int, torch.Tensor] = {}  # MoE layer -> decayed routing counts
        self.stats = TierStats()
        self._pending: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="k2quant-promote") if self.dynamic else None
        self._stream = torch.cuda.Stream(fast_device) if self.dynamic and fast_device.type == "cuda" else None
        c = self.config
        keys = [(i, e) for i in range(c.num_hidden_layers) if c.is_moe(i) for e in range(c.n_routed_experts)]
        for key in keys if progress is None else progress(keys):
            gate, up, down = self._stored(*key)
            self.nbytes[key] = gate.nbytes + up.nbytes + down.nbytes
            self.slow[key] = make_expert(gate, up, down, slow_device, mode)
            if fast_device is not None and key[1] in placed.get(key[0], ()):
                self.fast[key] = make_expert(gate, up, down, fast_device, mode)
        for i in {k[0] for k in keys}:
            self.score[i] = torch.zeros(c.n_routed_experts, dtype=torch.float64)

    def _stored(self, layer: int, expert: int):
        p = f"model.layers.{layer}.mlp.experts.{expert}."
        return [self.checkpoint.stored(p + f"{m}.weight") for m in ("gate_proj", "up_proj", "down_proj")]

    @property
    def fast_bytes(self) -> int:
        return sum(self.nbytes[k] for k in self.fast)

    @property
    def slow_bytes(self) -> int:
        return sum(k.nbytes for k in self.slow.values())

    def kernel(self, layer: int, expert: int) -> tuple[str, ExpertKernels]:
        k = self.fast.get((layer, expert))
        return ("fast", k) if k is not None else ("slow", self.slow[(layer, expert)])

    def record(self, layer: int, ids: torch.Tensor) -> None:
        """Count one step's routed (token, expert) pairs of a layer (hits by tier, bytes, scores)."""
        counts = torch.bincount(ids.flatten().cpu(), minlength=self.config.n_routed_experts)
        for e in torch.nonzero(counts).flatten().tolist():
            tier = "fast" if (layer, e) in self.fast else "slow"
            n = int(counts[e])
            self.stats.pairs[tier] += n
            self.stats.bytes[tier] += self.nbytes[(layer, e)]  # read once per step however many tokens use it
        self.score[layer] += counts.double()

    # -- dynamic placement
    def step(self) -> None:
        """Between decode steps: install finished promotions, decay the counts, schedule new moves."""
        if not self.dynamic:
            return
        self._install()
        for s in self.score.values():
            s.mul_(self.decay)
        moves = 0
        free = self.fast_budget - self.fast_bytes - sum(self.nbytes[k] for k in self._pending)
        for layer, s in sorted(self.score.items(), key=lambda kv: -float(kv[1].max())):
            if moves >= self.max_moves:
                break
            order = torch.argsort(s, descending=True, stable=True).tolist()
            for e in order[: self.config.num_experts_per_tok]:
                key = (layer, e)
                if key in self.fast or key in self._pending or s[e] <= 0:
                    continue
                nb = self.nbytes[key]
                if nb > free:
                    resident = [x for x in self.fast if x[0] == layer]
                    if not resident:
                        continue
                    victim = min(resident, key=lambda x: float(s[x[1]]))
                    if float(s[e]) <= self.margin * float(s[victim[1]]) or nb > free + self.nbytes[victim]:
                        continue
                    with self._lock:
                        del self.fast[victim]
                    self.stats.evictions += 1
                    free += self.nbytes[victim]
                self._pending[key] = self._pool.submit(self._build, key)
                free -= nb
                moves += 1
                if moves >= self.max_moves:
                    break

    def _build(self, key: tuple[int, int]) -> tuple[ExpertKernels, object]:
        gate, up, down = self._stored(*key)
        if self._stream is None:
            return make_expert(gate, up, down, self.fast_device, self.mode), None
        with torch.cuda.stream(self._stream):
            k = make_expert(gate, up, down, self.fast_device, self.mode)
            event = torch.cuda.Event()
            event.record(self._stream)
        return k, event

    def _install(self) -> None:
        for key, fut in list(self._pending.items()):
            if not fut.done():
                continue
            kernels, event = fut.result()
            if event is not None and not event.query():
                continue
            with self._lock:
                self.fast[key] = kernels
            del self._pending[key]
            self.stats.promotions += 1

    def drain(self) -> None:
        """Wait for scheduled promotions and install them (tests, shutdown)."""
        for fut in list(self._pending.values()):
            fut.result()
        if self._stream is not None:
            self._stream.synchronize()
        self._install()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
