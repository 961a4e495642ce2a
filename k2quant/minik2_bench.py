"""The bench model: mini-K2 trained long enough to have learned something (bench-only, cached).

Quantization differences mean little on a model that knows nothing. The demo's mini-K2
(`minik2.build`) trains for a few minutes so that the demo and the tests stay fast; the
accuracy benchmarks (`bench/lowbit.py`, `bench/gptq.py`, `bench/gguf_imatrix.py`,
`bench/q4km_cause.py`) use this build instead: the same architecture and the same
tokenizer (copied from the demo build, so perplexities compare token for token), trained
on more text (every Python standard-library source outside the test packages, with the
demo's training text) for BENCH_TRAIN's steps with linear warmup and cosine decay, about
an hour once on 2 cores. Training saves its state every 200 steps and resumes from it.

Its held-out text is the demo's (`minik2.corpus()`'s held-out documents: every tenth
top-level standard-library module and the last tenth of each bundled text, read by
neither model's training), and the benches score calib/heldout/'s prose, which no
training or calibration set reads (tests/test_datasets.py checks both). `BenchModel`
holds perplexities on both, for this model, for the demo model and for a unigram model of
this model's own training text (add-one smoothing), all on the same tokens; `describe`
is the line the benches print beside their tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from k2quant.formats.hf import write_json
from k2quant.formats.tokenizer import load_tokenizer

from . import minik2
from .config import K2Config
from .model import open_model

BENCH_TRAIN = dict(minik2.TRAIN, steps=1000, batch=8, seq=256, lr=2e-3, warmup=50)
BENCH_RECIPE_VERSION = 1
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "encodings", "__pycache__"}
_EVAL_SEQ = 128  # the demo build's perplexity window
_EVAL_WINDOWS = 64  # ... and its count (build.json's heldout_ppl_after)


@dataclass(frozen=True)
class Perplexities:
    """Perplexities of one text under the bench model, the demo model and a unigram model of the
    bench model's training text, over the same `tokens` predicted tokens."""

    text: str
    tokens: int
    bench: float
    demo: float
    unigram: float


@dataclass(frozen=True)
class BenchModel:
    """A finished bench build: where its releases are and what it measured."""

    fp8: str
    bf16: str
    demo_fp8: str
    train_tokens: int
    tokens_seen: int
    steps: int
    seconds: float
    loss_last: float
    perplexities: tuple[Perplexities, ...]

    def describe(self) -> str:
        """One line per text, as the benches print it beside their tables."""
        lines = [f"bench model (k2quant.minik2_bench: {self.steps} steps, {self.tokens_seen / 1e6:.1f}M tokens seen "
                 f"of {self.train_tokens / 1e6:.1f}M; {self.fp8}): perplexity, bench model / demo model / "
                 "unigram of its training text"]  # fmt: skip
        for p in self.perplexities:
            lines.append(f"  {p.text} ({p.tokens} tokens): {p.bench:.1f} / {p.demo:.1f} / {p.unigram:.1f}")
        return "\n".join(lines)


def recipe_hash() -> str:
    blob = json.dumps({"train": BENCH_TRAIN, "v": BENCH_RECIPE_VERSION, "demo": minik2.recipe_hash(),
                       "skip": sorted(_SKIP_PARTS)}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_dir() -> Path:
    """Where the bench model is cached: beside the demo build ($K2QUANT_HOME/mini-k2-bench)."""
    return minik2.default_dir().with_name("mini-k2-bench")


def corpus() -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the demo's training documents, then every
    standard-library source in a subpackage outside the test packages and the codec tables
    (sorted by path); the demo's held-out documents."""
    train, heldout = minik2.corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    extra = sorted(p for p in stdlib.rglob("*.py") if p.parent != stdlib and p.is_file()
                   and not _SKIP_PARTS & set(p.relative_to(stdlib).parts))  # fmt: skip
    train = train + [p.read_text(encoding="utf-8", errors="replace") for p in extra]
    return train, heldout


def _targets(stream: torch.Tensor, seq: int, max_windows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(stream) - 1) // seq
    n = n if max_windows is None else min(n, max_windows)
    return stream[: n * seq].view(n, seq), stream[1 : n * seq + 1].view(n, seq)


def unigram_perplexity(train_stream: torch.Tensor, stream: torch.Tensor, vocab: int,
                       max_windows: int | None = None) -> float:  # fmt: skip
    """The perplexity of a unigram model of `train_stream` (add-one smoothing over the
    vocabulary) on the same predicted tokens as `minik2.perplexity`."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    _, y = _targets(stream, _EVAL_SEQ, max_windows)
    return math.exp(-logp[y.flatten()].mean().item())


def _texts(tok, heldout_docs: list[str]) -> list[tuple[str, torch.Tensor, int | None]]:
    """(name, token stream, windows scored): the demo's held-out text as the demo build measures
    it (its first 64 windows) and whole, and calib/heldout/'s prose, each file whole."""
    demo = minik2.token_stream(tok, heldout_docs)
    out = [("demo held-out text, first 64 windows (build.json's measure)", demo, _EVAL_WINDOWS),
           ("demo held-out text, all of it", demo, None)]  # fmt: skip
    root = resources.files("k2quant.calib") / "heldout"
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".txt"):
            ids = torch.tensor(tok.encode(entry.read_text(encoding="utf-8")))
            out.append((f"calib/heldout/{entry.name}", ids, None))
    return out


def load(out: str | Path) -> BenchModel:
    info = json.loads((Path(out) / "build.json").read_text())
    return BenchModel(**{k: v for k, v in info.items() if k in BenchModel.__dataclass_fields__ and k != "perplexities"},
                      perplexities=tuple(Perplexities(**p) for p in info["perplexities"]))  # fmt: skip


def build(out: str | Path | None = None, echo: Callable[[str], None] = print, progress: bool = True) -> BenchModel:
    """Build the bench model under `out` (default `default_dir()`): model-fp8/, model-bf16/ and
    build.json; reuse a finished build of the same recipe, resume an interrupted one. Builds the
    demo model first if it is not cached (its tokenizer is this model's)."""
    out = Path(out) if out is not None else default_dir()
    info_path = out / "build.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("recipe") == recipe_hash() and (out / "model-fp8" / "model.safetensors.index.json").exists():
            echo(f"bench mini-K2: reusing {out}")
            return load(out)
    demo = minik2.build(minik2.default_dir(), echo=echo, progress=progress)
    t0 = time.time()
    torch.manual_seed(BENCH_TRAIN["seed"])
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for f in sorted((Path(demo["fp8"]).parent / "tokenizer").iterdir()):
        (tok_dir / f.name).write_bytes(f.read_bytes())
    tok = load_tokenizer(tok_dir)
    train_docs, heldout_docs = corpus()
    train_stream = minik2.token_stream(tok, train_docs)
    cfg_dict = minik2.config_dict()
    cfg = K2Config.from_dict(cfg_dict)
    params = minik2.init_params(cfg, BENCH_TRAIN["seed"])
    echo(f"bench mini-K2: {len(train_stream) / 1e6:.2f}M training tokens, {BENCH_TRAIN['steps']} steps of "
         f"{BENCH_TRAIN['batch']} x {BENCH_TRAIN['seq']} tokens")  # fmt: skip
    stats = minik2.train(cfg, params, train_stream, progress, recipe=BENCH_TRAIN, state_path=out / "train-state.pt")
    minik2.save_release(out, cfg_dict, {k: v.detach() for k, v in params.items()}, tok_dir)
    bench_model, demo_model = open_model(out / "model-bf16", resident=True), open_model(demo["bf16"], resident=True)
    ppls = []
    for name, stream, windows in _texts(tok, heldout_docs):
        ppls.append(Perplexities(name, int(_targets(stream, _EVAL_SEQ, windows)[1].numel()),
                                 minik2.perplexity(bench_model, stream, _EVAL_SEQ, windows),
                                 minik2.perplexity(demo_model, stream, _EVAL_SEQ, windows),
                                 unigram_perplexity(train_stream, stream, cfg.vocab_size, windows)))  # fmt: skip
    info = {
        "recipe": recipe_hash(),
        "fp8": str(out / "model-fp8"),
        "bf16": str(out / "model-bf16"),
        "demo_fp8": str(demo["fp8"]),
        "train_tokens": len(train_stream),
        "tokens_seen": BENCH_TRAIN["steps"] * BENCH_TRAIN["batch"] * BENCH_TRAIN["seq"],
        "steps": BENCH_TRAIN["steps"],
        "seconds": round(time.time() - t0, 1),
        "loss_last": stats["loss_last"],
        "loss_every_100_steps": stats["loss_history"][::100],
        "max_over_mean_expert_load": stats["max_over_mean_expert_load"],
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "perplexities": [asdict(p) for p in ppls],
    }
    write_json(info_path, info)
    model = load(out)
    echo(model.describe())
    return model


def releases(demo: bool = False) -> tuple[Path, Path, str]:
    """(FP8 release, BF16 release, what to print about the model) of the bench model, or with
    `demo` of the demo's mini-K2 (the benches' --demo-model: minutes instead of an hour)."""
    if demo:
        info = minik2.build(minik2.default_dir(), progress=False)
        about = (f"demo mini-K2 ({info['tokens_seen'] / 1e6:.2f}M tokens seen; held-out perplexity "
                 f"{info['heldout_ppl_after']:.1f}): not the bench model, see k2quant/minik2_bench.py")  # fmt: skip
        return Path(info["fp8"]), Path(info["bf16"]), about
    model = build(progress=True)
    return Path(model.fp8), Path(model.bf16), model.describe()


if __name__ == "__main__":
    build()
