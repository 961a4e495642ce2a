"""The runner's weight source: resident, packed, placed on two tiers, behind the forward's seams.

`RunnerWeights` is a `model.Weights`: `linear(name, x)` runs the kernel of that weight on
the tier it was placed on (the input moved there and the output back), `get(name)` serves
the small float32 tensors (norms, router, correction bias) and decodes the few weights the
forward reads whole (kv_b_proj for absorbed attention) per call, except that `heads` multiplies
an FP8 or bf16 kv_b_proj on the CPU as stored (runner/kernels.py StoredHeads), `embedding(ids)` gathers
rows of the embedding table as stored. `RunnerExperts` is the routed-experts seam: experts
on the fast tier run there, the others on the CPU, on a worker thread when the two tiers
differ, so they overlap with the shared expert, which the forward runs meanwhile.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from k2quant.checkpoint import StoredWeight
from k2quant.model import Done, ExpertFn, HeadProducts, Pending, RoutedExperts, Weights
from k2quant.names import parse_name
from k2quant.quant import matvec_kernel
from k2quant.quant.forms import form

from .kernels import FP8CPU, DenseLinear, DequantLinear, Linear, StoredHeads, compute_dtype, make_linear
from .placement import Placement, tensor_class
from .store import ExpertStore


class RunnerWeights(Weights):
    def __init__(self, checkpoint, placement: Placement, mode: str, gpu: torch.device | None, progress=None):
        compute = gpu if gpu is not None else torch.device("cpu")
        super().__init__(compute, compute_dtype(mode))
        self.checkpoint, self.placement, self.mode = checkpoint, placement, mode
        self.linears: dict[str, Linear] = {}
        self.small: dict[str, torch.Tensor] = {}
        self.embed: StoredWeight | None = None
        self.tier_bytes = {"gpu": 0, "cpu": 0}
        if mode == "fast":
            matvec_kernel.warm()  # the CPU matvecs' compiled code loaded now, not in the first timed step
        names = [n for n in checkpoint.names() if tensor_class(n) != "routed_experts"]
        for name in names if progress is None else progress(names):
            dev = gpu if gpu is not None and name in placement.gpu else torch.device("cpu")
            cls = tensor_class(name)
            stored = checkpoint.stored(name)
            if cls == "embeddings":  # kept as stored in RAM; a forward decodes only the rows it reads
                self.embed = StoredWeight(name, stored.format, stored.shape,
                                          {k: v.clone() for k, v in stored.parts.items()}, stored.block)  # fmt: skip
                nb = self.embed.nbytes
                if checkpoint.config.tie_word_embeddings:
                    self.linears["model.embed_tokens"] = make_linear(self.embed, compute, mode)
            elif parse_name(name).is_linear or name == "lm_head.weight":
                module = name.removesuffix(".weight")
                if module.endswith("kv_b_proj") and not (mode == "fast" and dev.type == "cpu" and
                                                         FP8CPU.supports(stored)):  # fmt: skip
                    # read whole by absorbed attention (model.Weights.heads): kept decodable per call
                    k = DenseLinear(stored.parts["weight"], dev, self.dtype) if stored.format == "dense" else \
                        DequantLinear(stored, dev, self.dtype)  # fmt: skip
                else:
                    k = make_linear(stored, dev, mode)
                self.linears[module] = k
                nb = k.nbytes
            else:  # norms, router weight and correction bias: float32, as the routing needs
                self.small[name] = stored.dequantize(torch.float32).to(compute)
                nb = self.small[name].nbytes
            self.tier_bytes["gpu" if dev.type != "cpu" else "cpu"] += nb

    def fetch(self, name: str) -> torch.Tensor:
        if name in self.small:
            return self.small[name]
        k = self.linears.get(name.removesuffix(".weight"))
        if isinstance(k, DequantLinear):
            return form(k.format).dequantize(k.parts, k.shape, k.block).to(self.device, self.dtype)
        if isinstance(k, DenseLinear):
            return k.weight.to(self.device, self.dtype)
        if isinstance(k, FP8CPU):
            return matvec_kernel.decode_bf16(k.codes).to(self.device, self.dtype)
        raise KeyError(f"{name}: not readable whole from the runner's weights")

    def get(self, name: str) -> torch.Tensor:
        return self.fetch(name)  # small tensors are already float32 on the compute device; no cache needed

    def heads(self, name: str, heads: int, nope: int, dtype: torch.dtype) -> HeadProducts:
        k = self.linears.get(name)
        if dtype == torch.float32 and isinstance(k, FP8CPU):  # FP8 codes multiplied as stored, float32 sums
            return StoredHeads(k.codes, heads, nope)
        if (dtype == torch.float32 and self.mode == "fast" and isinstance(k, DenseLinear) and k.device.type == "cpu"
                and k.weight.dtype == torch.bfloat16):  # fmt: skip
            return StoredHeads(matvec_kernel.Codes.from_bf16(k.weight), heads, nope)
        return super().heads(name, heads, nope, dtype)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        k = self.linears[name]
        return k(x.to(k.device)).to(self.device)

    def embedding(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed
        flat = ids.reshape(-1).cpu()
        if e.format == "dense":
            rows = F.embedding(flat, e.parts["weight"])
        elif e.format.startswith("ggml:"):  # ggml rows decode on their own
            rows = form(e.format).dequantize({"data": e.parts["data"][flat]}, (flat.numel(), e.shape[1]), None)
        else:
            rows = e.dequantize()[flat]
        return rows.view(*ids.shape, e.shape[1]).to(self.device, self.dtype)


class RunnerExperts(RoutedExperts):
    """Routed experts from an ExpertStore: fast-tier ones computed now, slow-tier ones on the CPU
    (on a worker thread when the tiers differ); `threads` is torch's CPU thread count for them."""

    def __init__(self, store: ExpertStore, threads: int):
        self.store = store
        self.threads = threads
        torch.set_num_threads(threads)
        split = store.fast_device is not None and store.fast_device != store.slow_device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="k2quant-cpu-experts") if split else None

    def submit(self, layer: int, x: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               expert: ExpertFn) -> Pending:  # fmt: skip
        self.store.record(layer, ids)
        fast, slow = [], []
        for e in torch.unique(ids).tolist():
            tier, k = self.store.kernel(layer, e)
            (fast if tier == "fast" else slow).append((e, k))
        if self._pool is None:
            return Done(_run(fast + slow, x, ids, weights, x.device))
        cpu_part: Future | None = None
        if slow:
            cpu_part = self._pool.submit(_run, slow, x.to("cpu"), ids.cpu(), weights.cpu(), torch.device("cpu"))
        out = _run(fast, x, ids, weights, x.device)
        return _Joined(out, cpu_part)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _run(experts: list, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
         device: torch.device) -> torch.Tensor:  # fmt: skip
    """sum over the given experts of weight * expert(x) for their tokens, on `device`."""
    out = torch.zeros(x.shape, dtype=x.dtype, device=device)
    for e, k in sorted(experts, key=lambda ek: ek[0]):
        tok, slot = torch.where(ids == e)
        y = k(x[tok].to(k.device)).to(device, x.dtype)
        out.index_add_(0, tok.to(device), y * weights[tok, slot, None].to(device, x.dtype))
    return out


class _Joined:
    def __init__(self, out: torch.Tensor, cpu_part: Future | None):
        self.out, self.cpu_part = out, cpu_part

    def result(self) -> torch.Tensor:
        if self.cpu_part is None:
            return self.out
        return self.out + self.cpu_part.result().to(self.out.device)
