"""Opening a model for local generation: devices, budgets, placement, the packed weights, the engine.

`Runner(path, RunOptions(...))` opens anything `open_model` opens, decides the devices
(`cuda` when a GPU is present, else `cpu`), the GPU budget (`gpu_memory`, by default the
free VRAM less GPU_MARGIN; the KV cache and working buffers come out of it), places the
weights (placement.py), checks the RAM before loading anything, loads the weights packed
(weights.py, store.py) and builds the engine. `generate` streams token ids; `report()`
gives the statistics the CLI prints: speeds, placement, the GPU share of routed-expert
work, bytes read per token against the measured bandwidth bound, RSS against the packed
bytes held, VRAM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from k2quant.checkpoint import open_checkpoint
from k2quant.errors import K2QuantError
from k2quant.formats.chat import ChatTemplate
from k2quant.memory import meminfo, peak_rss
from k2quant.model import K2Model

from .bandwidth import read_bandwidth
from .engine import DEFAULT_TEMPERATURE, Engine, Sampling
from .placement import Placement, bytes_per_token, place, tensor_class
from .store import ExpertStore
from .weights import RunnerExperts, RunnerWeights

GPU_MARGIN = 3 << 29  # 1.5 GiB of free VRAM left to the driver, CUDA context and fragmentation
WORK_BYTES_PER_TOKEN = 64 << 10  # activations of one prefill token on the GPU (K2: hidden 7168 .. 18432 wide)


@dataclass
class RunOptions:
    device: str | None = None  # "cuda" | "cpu"; None: cuda when available
    gpu_memory: int | None = None  # bytes the runner may use on the GPU; None: free VRAM - GPU_MARGIN
    hotness: dict[int, list[float]] | None = None  # calibrate's hotness.json, read
    threads: int | None = None  # CPU threads for experts (torch's intra-op threads); None: all cores
    ctx: int = 4096
    mode: str = "fast"  # "fast" (bf16, packed kernels) | "exact" (float32, the stored forms' own decoding)
    dynamic: bool = True  # promote / evict experts between tokens
    prefill_chunk: int = 512
    prefix_cache: int = 1  # KV caches of this many recent conversations kept for prefix reuse (serve)
    ram_bandwidth: float | None = None  # bytes/s; None: measured (cached)


def available_ram() -> int:
    avail = meminfo("MemAvailable")
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_temperature(path: str | Path) -> float:
    """generation_config.json's temperature when the model has one, else Kimi's 0.6 for Instruct."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / "generation_config.json"
    try:
        t = json.loads(f.read_text(encoding="utf-8")).get("temperature")
    except (OSError, ValueError, AttributeError, RecursionError):
        return DEFAULT_TEMPERATURE
    # a bool is no temperature; float() of a huge int overflows, and an infinite one samples uniformly
    ok = isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= 1e6
    return float(t) if ok else DEFAULT_TEMPERATURE


class Runner:
    def __init__(self, path: str | Path, opts: RunOptions, progress: bool = True):
        from tqdm import tqdm

        self.path, self.opts = Path(path), opts
        ck = self.checkpoint = open_checkpoint(path)
        cfg = self.config = ck.config
        want = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if want not in ("cuda", "cpu"):
            raise K2QuantError(f"--device must be cuda or cpu, got {want!r}")
        if want == "cuda" and not torch.cuda.is_available():
            raise K2QuantError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        self.gpu = torch.device("cuda") if want == "cuda" else None
        self.threads = opts.threads if opts.threads is not None else (os.cpu_count() or 1)
        if self.threads < 1:
            raise K2QuantError(f"--threads must be >= 1, got {self.threads}")
        self.inventory = {n: ck.info(n).stored_bytes for n in ck.names()}
        elem = 2 if self.gpu is not None or opts.mode == "fast" else 4
        self.kv_bytes = opts.ctx * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem
        self.kv_bytes *= max(1, opts.prefix_cache)  # every slot may be allocated
        budget = 0
        if self.gpu is not None:
            free = torch.cuda.mem_get_info(self.gpu)[0]
            if opts.gpu_memory is not None and opts.gpu_memory > free:
                name = torch.cuda.get_device_name(self.gpu)
                raise K2QuantError(f"--gpu-memory {opts.gpu_memory / 2**30:.1f} GiB is more than the "
                                   f"{free / 2**30:.1f} GiB free on {name}")  # fmt: skip
            total = opts.gpu_memory if opts.gpu_memory is not None else max(0, free - GPU_MARGIN)
            budget = total - self.kv_bytes - opts.prefill_chunk * WORK_BYTES_PER_TOKEN
            if budget < 0:
                raise K2QuantError(f"--gpu-memory {total / 2**30:.2f} GiB does not hold the KV cache of --ctx "
                                   f"{opts.ctx} x {max(1, opts.prefix_cache)} cached conversations "
                                   f"({self.kv_bytes / 2**30:.2f} GiB) and the working buffers")  # fmt: skip
        self.placement: Placement = place(self.inventory, cfg, budget, opts.hotness)
        experts = sum(nb for n, nb in self.inventory.items() if tensor_class(n) == "routed_experts")
        self.ram_needed = experts + sum(
            nb
            for n, nb in self.inventory.items()
            if tensor_class(n) != "routed_experts" and n not in self.placement.gpu
        )
        self.ram_needed += self.kv_bytes if self.gpu is None else 0
        avail = available_ram()
        if self.ram_needed > avail:
            raise K2QuantError(f"{path}: the model needs {self.ram_needed / 1e9:.1f} GB of RAM on this placement "
                               f"(packed weights held on the CPU, and the KV cache there), but "
                               f"{avail / 1e9:.1f} GB are available")  # fmt: skip
        bar = lambda items, d: tqdm(items, desc=d, unit="tensor", disable=not progress, leave=False)  # noqa: E731
        self.weights = RunnerWeights(ck, self.placement, opts.mode, self.gpu,
                                     progress=lambda xs: bar(xs, "loading"))  # fmt: skip
        dense_gpu = self.weights.tier_bytes["gpu"]
        self.store = ExpertStore(ck, opts.mode, torch.device("cpu"), self.gpu, max(0, budget - dense_gpu),
                                 self.placement.gpu_experts, dynamic=opts.dynamic,
                                 progress=lambda xs: bar(xs, "experts"))  # fmt: skip
        self.model = K2Model(cfg, self.weights)
        self.model.routed = RunnerExperts(self.store, self.threads)
        self._steps = 0
        self.engine = Engine(self.model, opts.ctx, opts.prefill_chunk, on_step=self._on_step, slots=opts.prefix_cache)
        self.tokenizer = None
        tok_dir = self.path if self.path.is_dir() else self.path.parent
        if (tok_dir / "tiktoken.model").exists():
            from k2quant.formats.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(tok_dir)
            self.engine.vocab = min(self.tokenizer.vocab_size, cfg.vocab_size)
        self.template = ChatTemplate.load(tok_dir)  # the model's own chat template (sandboxed), else K2's format
        self.default_temperature = default_temperature(path)
        self.ctx = opts.ctx
        self._decode_bytes = {"fast": 0, "slow": 0}  # routed-expert bytes of the last answer's decode steps
        self._decode_steps = 0

    @property
    def stats(self):
        """The last generation's statistics (the engine's)."""
        return self.engine.stats

    def _on_step(self) -> None:
        self._steps += 1
        self.store.step()

    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """The engine's token ids; expert bytes of the decode steps are counted for report()."""
        first = True
        before = dict(self.store.stats.bytes)
        steps0 = self._steps
        try:
            for t in self.engine.generate(prompt, sampling):
                if first:  # prefill is done: count decode from here
                    before, steps0, first = dict(self.store.stats.bytes), self._steps, False
                yield t
        finally:
            self._decode_steps = self._steps - steps0
            self._decode_bytes = {k: self.store.stats.bytes[k] - before[k] for k in before}

    def bandwidth(self) -> tuple[float, str]:
        if self.opts.ram_bandwidth:
            return self.opts.ram_bandwidth, "given"
        bw, cached = read_bandwidth(self.threads)
        return bw, "measured earlier (cached)" if cached else "measured now"

    def report(self) -> dict:
        st = self.engine.stats
        dense = self.weights.tier_bytes
        steps = max(1, self._decode_steps)
        per_token = {"gpu": dense["gpu"] + self._decode_bytes["fast"] / steps,
                     "cpu": dense["cpu"] + self._decode_bytes["slow"] / steps}  # fmt: skip
        predicted = bytes_per_token(self.placement, self.inventory, self.config)
        bw, how = self.bandwidth()
        bound_tps = bw / per_token["cpu"] if per_token["cpu"] else float("inf")
        packed_cpu = dense["cpu"] + self.store.slow_bytes
        out = {
            "prompt_tokens": st.prompt_tokens, "cached_tokens": st.cached_tokens,
            "prefill_tokens_per_s": st.prefill_tps, "decode_tokens": st.decode_tokens,
            "decode_tokens_per_s": st.decode_tps, "finish_reason": st.finish_reason,
            "device": "cuda+cpu" if self.gpu is not None else "cpu", "threads": self.threads, "mode": self.opts.mode,
            "placement": {**self.placement.summary(), "gpu_expert_bytes": self.store.fast_bytes,
                          "gpu_routed_experts_now": len(self.store.fast), "promotions": self.store.stats.promotions,
                          "evictions": self.store.stats.evictions},
            "gpu_share_of_routed_work": self.store.stats.fast_share(),
            "bytes_per_token": per_token, "bytes_per_token_uniform_routing": predicted,
            "ram_bandwidth": bw, "ram_bandwidth_source": how,
            "cpu_bound_tokens_per_s": bound_tps,
            "ratio_to_bound": (st.decode_tps / bound_tps) if st.decode_tps and self.gpu is None else None,
            "peak_rss": peak_rss(), "packed_cpu_bytes": packed_cpu, "kv_cache_bytes": self.engine.cache_bytes(),
            "vram_peak": torch.cuda.max_memory_allocated(self.gpu) if self.gpu is not None else 0,
        }  # fmt: skip
        return out

    def close(self) -> None:
        self.model.routed.close()
        self.store.close()
