"""The engine: chunked prefill, decode and sampling, as a generator of token ids.

It knows nothing of text (runner/text.py turns ids into text and handles stop strings).
It owns `slots` preallocated MLA caches (one per recent conversation, least recently used
reused first, each allocated when first needed) and remembers the token ids each holds, so
a follow-up prompt that starts with them (a chat's next turn, an agent resending its
conversation) only prefills what is new: `generate` picks the cache with the longest common
prefix, keeps that prefix and truncates the rest. Tested against `model.generate`, the
naive greedy reference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from k2quant.errors import K2QuantError
from k2quant.model import K2Model, MLACache

DEFAULT_TEMPERATURE = 0.6  # Kimi's recommendation for K2-Instruct


@dataclass
class Sampling:
    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until a stop token or the end of the context
    stop_ids: tuple[int, ...] = ()

    def check(self) -> None:
        """One clear error for a value out of range, naming the parameter."""
        if not (self.temperature >= 0 and self.temperature == self.temperature):
            raise K2QuantError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise K2QuantError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise K2QuantError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise K2QuantError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise K2QuantError(f"max_tokens must be >= 1, got {self.max_tokens}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token from float32 logits [vocab]: greedy at temperature 0, else temperature, then
    top-k, top-p (nucleus) and min-p filters, then a draw from `generator`."""
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_k:
        kth = torch.topk(probs, min(s.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0)
    if s.min_p > 0:
        probs = torch.where(probs >= s.min_p * probs.max(), probs, 0)
    if s.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = cum - sorted_p > s.top_p * cum[-1]  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order[drop], 0)
    return int(torch.multinomial(probs.cpu() / probs.sum().cpu(), 1, generator=generator))


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens already in the cache (prefix reuse)
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0  # forwards of one new token each (the last token yielded is not run)
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" | "length"

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Slot:
    """One conversation's KV cache and the token ids it holds."""

    cache: MLACache
    tokens: list[int]
    prompt_len: int = 0  # the last prompt's length: a prompt that keeps all of it continues this conversation


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Generation over one K2Model with caches of `ctx` tokens each (`slots` of them, for prefix reuse
    across conversations); `on_step` runs between decode steps (the runner's dynamic expert placement)."""

    def __init__(self, model: K2Model, ctx: int, prefill_chunk: int = 512, cache_dtype: torch.dtype | None = None,
                 on_step=None, slots: int = 1):  # fmt: skip
        limit = model.config.max_position_embeddings
        if ctx > limit:
            raise K2QuantError(f"--ctx {ctx} is longer than the model's maximum ({limit} tokens)")
        if slots < 1:
            raise K2QuantError(f"--prefix-cache must be >= 1, got {slots}")
        self.model, self.ctx, self.prefill_chunk = model, ctx, prefill_chunk
        self.cache_dtype = cache_dtype or model.weights.dtype
        self.max_slots = slots
        self.slots: list[Slot] = [self._new_slot()]  # least recently used first
        self.on_step = on_step
        self.stats = Stats()
        # sample only ids below this: the tokenizer's vocabulary (a checkpoint may pad its embedding past it,
        # and an id the tokenizer cannot decode must never be drawn); None: every logit
        self.vocab: int | None = None

    def _new_slot(self) -> Slot:
        return Slot(MLACache(self.model.config, self.ctx, device=self.model.device, dtype=self.cache_dtype), [])

    @property
    def cache(self) -> MLACache:
        """The cache of the most recent conversation."""
        return self.slots[-1].cache

    @property
    def tokens(self) -> list[int]:
        return self.slots[-1].tokens

    @tokens.setter
    def tokens(self, ids: list[int]) -> None:
        self.slots[-1].tokens = ids

    def cache_bytes(self) -> int:
        """Bytes of the caches allocated so far (at most `slots` x one cache)."""
        return sum(s.cache.nbytes() for s in self.slots)

    def _pick(self, prompt: list[int]) -> int:
        """Make the slot for `prompt` the most recent (last) and return how many of its cached tokens it keeps.

        A prompt that starts with a slot's last prompt continues that conversation in its slot (the answer's
        tail may differ: a template re-renders it). One that shares less (another conversation with the same
        system prompt and tools, or one whose template rewrote an earlier turn) must not cut that one short: it
        takes a free slot, or the least recently used other one, and copies the shared prefix into it
        (a memory copy instead of a prefill). With a single slot the one cache is truncated."""
        keeps = [common_prefix(s.tokens, prompt[:-1]) for s in self.slots]  # at least one token runs for logits
        best = max(range(len(keeps)), key=lambda i: (keeps[i], i))
        keep = keeps[best]
        target = best
        if keep < self.slots[best].prompt_len:  # not this conversation continued: keep it for its next turn
            if len(self.slots) < self.max_slots:
                self.slots.append(self._new_slot())
                target = len(self.slots) - 1
            elif len(self.slots) > 1:
                target = next(i for i in range(len(self.slots)) if i != best)  # least recently used other
        if target != best:
            src, dst = self.slots[best], self.slots[target]
            if keep:
                dst.cache.latent[:, :, :keep].copy_(src.cache.latent[:, :, :keep])
                dst.cache.k_rot[:, :, :keep].copy_(src.cache.k_rot[:, :, :keep])
            dst.cache.truncate(0)
            dst.cache.advance(keep)
            dst.tokens = src.tokens[:keep]
        self.slots.append(self.slots.pop(target))
        return keep

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.no_grad()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        logits = self.model.forward(torch.tensor([ids], dtype=torch.long), self.cache)
        self.tokens.extend(ids)
        return logits[0, -1, : self.vocab].float()

    @torch.no_grad()
    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """Token ids after `prompt`, one at a time, until a stop id (not yielded), max_tokens or the
        context's end (finish_reason "length"). The cache keeps prompt and answer for the next call."""
        sampling.check()
        if not prompt:
            raise K2QuantError("the prompt is empty")
        if len(prompt) >= self.ctx:
            raise K2QuantError(f"the prompt has {len(prompt)} tokens; the context (--ctx) holds {self.ctx}")
        st = self.stats = Stats(prompt_tokens=len(prompt))
        keep = self._pick(prompt)
        self.slots[-1].prompt_len = len(prompt)
        self.cache.truncate(keep)
        del self.tokens[keep:]
        st.cached_tokens = keep
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        t0 = time.perf_counter()
        rest = prompt[keep:]
        for i in range(0, len(rest), self.prefill_chunk):
            logits = self._forward(rest[i : i + self.prefill_chunk])
        self._sync()
        st.prefill_seconds = time.perf_counter() - t0
        limit = sampling.max_tokens
        while True:
            t = time.perf_counter()
            nxt = sample(logits, sampling, gen)
            if nxt in sampling.stop_ids:
                st.finish_reason = "stop"
                return
            yield nxt
            st.decode_tokens += 1
            if (limit is not None and st.decode_tokens >= limit) or len(self.tokens) + 1 >= self.ctx:
                st.finish_reason = "length"  # the last token is not run into the cache: a next prompt runs it
                return
            logits = self._forward([nxt])
            if self.on_step is not None:
                self.on_step()
            self._sync()
            st.decode_seconds += time.perf_counter() - t
            st.decode_steps += 1
