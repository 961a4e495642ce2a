"""mini-K2: Kimi K2's architecture scaled down, trained by k2quant itself, saved as K2 ships.

No test machine can download the 1 TB release, and a random-weight model says little
about quantization: its output distribution is nearly flat and its weights have none of
a trained model's structure. mini-K2 is architecturally K2 (MLA with q and kv LoRA, one
dense layer then MoE layers with a shared expert, sigmoid noaux_tc routing with
e_score_correction_bias, YaRN) with every linear's input width a multiple of 256, so
every GGUF k-quant applies; it is trained for a few minutes on real text present on
every machine (the Python standard library's sources) plus the bilingual text bundled
in k2quant.calib, with the project's own forward.

Everything is seeded and ordered; the same machine gives the same bytes. The chat transcripts
of the training text are rendered in the chat format of the recipe's version (`_chat_v1`), not
the current one, so that a change of K2's chat format changes no weights; the tokenizer carries
K2's current chat template (`K2_CHAT_TEMPLATE`), which a reused build is brought up to date with.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from k2quant.calib.datasets import bundled_texts
from k2quant.formats.chat import K2_CHAT_TEMPLATE
from k2quant.formats.hf import save_checkpoint, write_json
from k2quant.formats.tokenizer import CONFIG_FILE, K2Tokenizer, load_tokenizer, save_tokenizer, train_bpe

from .config import K2Config
from .model import DictWeights, K2Model
from .names import expected_shapes, parse_name
from .release import release_tensors
from .synthetic import k2_config_dict

NUM_BASE_TOKENS = 3840  # + 256 specials = 4096
DIMS = dict(
    vocab_size=NUM_BASE_TOKENS + 256,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=16384,
    bos_token_id=NUM_BASE_TOKENS,
    eos_token_id=NUM_BASE_TOKENS + 1,
)
TRAIN = dict(
    seed=0,
    steps=150,
    batch=8,
    seq=128,
    lr=3e-3,
    warmup=15,
    bias_update=0.01,
    calib_repeat=8,
    tokenizer_chars=2_000_000,
    heldout_every=10,
)
RECIPE_VERSION = 1


def config_dict() -> dict:
    cfg = k2_config_dict(**DIMS)
    # YaRN x32 over an original 512-token window: 16K positions, as K2's 4K x 32 = 128K
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=512)
    return cfg


def recipe_hash() -> str:
    blob = json.dumps({"dims": DIMS, "train": TRAIN, "v": RECIPE_VERSION, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- data
def corpus() -> tuple[list[str], list[str]]:
    """(train documents, held-out documents): stdlib sources and the bundled bilingual text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    train, heldout = [], []
    for i, p in enumerate(files):
        text = p.read_text(encoding="utf-8", errors="replace")
        (heldout if i % TRAIN["heldout_every"] == 0 else train).append(text)
    for _, text in sorted(bundled_texts(render=_chat_v1).items()):  # the chat format of recipe v1
        cut = int(len(text) * 0.9)
        train.extend([text[:cut]] * TRAIN["calib_repeat"])
        heldout.append(text[cut:])
    return train, heldout


def _chat_v1(messages: list[dict], tools: list[dict] | None) -> str:
    """The K2 chat format mini-K2's recipe version 1 was trained on (k2quant's render_chat of that time,
    without generation prompt): no <think></think>, tool JSON compact with keys deep-sorted. Frozen
    here because the training text, unlike the chat template, decides the weights; a new recipe
    version may train on the current format (`render_chat`) instead."""

    def compact(obj) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    out = []
    if tools:
        out.append(f"<|im_system|>tool_declare<|im_middle|>{compact(tools)}<|im_end|>")
    if not messages or messages[0].get("role") != "system":
        out.append("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>")
    for m in messages:
        role = m["role"]
        name = m.get("name", role)
        content = m.get("content") or ""
        if role == "system":
            out.append(f"<|im_system|>{name}<|im_middle|>{content}<|im_end|>")
        elif role == "user":
            out.append(f"<|im_user|>{name}<|im_middle|>{content}<|im_end|>")
        elif role == "assistant":
            calls = ""
            if m.get("tool_calls"):
                parts = []
                for c in m["tool_calls"]:
                    args = c["function"]["arguments"]
                    args = args if isinstance(args, str) else compact(args)
                    parts.append(f"<|tool_call_begin|>{c['id']}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
                calls = "<|tool_calls_section_begin|>" + "".join(parts) + "<|tool_calls_section_end|>"
            out.append(f"<|im_assistant|>{name}<|im_middle|>{content}{calls}<|im_end|>")
        elif role == "tool":
            out.append(f"<|im_system|>tool<|im_middle|>## Return of {m.get('tool_call_id', '')}\n{content}<|im_end|>")
        else:
            raise ValueError(f"unknown chat role {role!r}")
    return "".join(out)


def token_stream(tok: K2Tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d, allow_special=True))
        ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------- model
def init_params(cfg: K2Config, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = 0.02 if parse_name(name).component == "embeddings" else 1 / math.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * cfg.num_hidden_layers)
            t = torch.randn(shape, generator=g) * std
        params[name] = t.requires_grad_(not name.endswith("e_score_correction_bias"))
    return params


@torch.no_grad()
def perplexity(model: K2Model, stream: torch.Tensor, seq: int, max_windows: int | None = 64) -> float:
    """exp(mean next-token NLL) over the first `max_windows` consecutive windows of `seq` tokens (all with None)."""
    n = (len(stream) - 1) // seq if max_windows is None else min(max_windows, (len(stream) - 1) // seq)
    x = stream[: n * seq].view(n, seq)
    y = stream[1 : n * seq + 1].view(n, seq)
    nll = 0.0
    for i in range(0, n, 16):
        logits = model.forward(x[i : i + 16]).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i : i + 16].flatten(), reduction="sum").item()
    return math.exp(nll / (n * seq))


def train(
    cfg: K2Config,
    params: dict[str, torch.Tensor],
    stream: torch.Tensor,
    progress: bool = True,
    steps: int | None = None,
    recipe: dict | None = None,
    state_path: Path | None = None,
    save_every: int = 200,
) -> dict:
    """AdamW on next-token loss with linear warmup then cosine decay; after each step the correction
    bias of every MoE layer moves toward balance (DeepSeek-V3's auxiliary-loss-free method:
    overloaded experts down, underloaded up).

    `recipe` defaults to TRAIN. With `state_path`, the parameters, optimizer, sampler and loss
    history are saved there every `save_every` steps (temporary file, then rename) and a run
    started again resumes from the last save, to the same bytes as an uninterrupted run; the file
    is removed when training ends. It is read with torch.load(weights_only=True): tensors and
    plain containers only, never code."""
    t = dict(recipe or TRAIN)
    t["steps"] = steps or t["steps"]
    model = K2Model(cfg, DictWeights(params))
    loads: dict[int, torch.Tensor] = {}

    def on_route(layer, scores, ids, weights):
        loads[layer] = loads.get(layer, 0) + torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts)

    model.route_observer = on_route
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=t["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(t["seed"] + 1)
    history: list[float] = []
    first = 0
    if state_path is not None and state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        if saved.get("recipe") != json.dumps(t, sort_keys=True) or sorted(saved["params"]) != sorted(params):
            raise RuntimeError(f"{state_path}: saved by a different training run; remove it to start over")
        with torch.no_grad():
            for name, value in saved["params"].items():
                params[name].copy_(value)
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["rng"])
        history, first = list(saved["history"]), int(saved["step"])
    bar = tqdm(range(first, t["steps"]), desc="training mini-K2", unit="step", disable=not progress,
               initial=first, total=t["steps"])  # fmt: skip
    for step in bar:
        lr = t["lr"] * min(1.0, (step + 1) / t["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / t["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - t["seq"] - 1, (t["batch"],), generator=g)
        x = torch.stack([stream[s : s + t["seq"]] for s in starts.tolist()])
        y = torch.stack([stream[s + 1 : s + t["seq"] + 1] for s in starts.tolist()])
        loads.clear()
        logits = model.forward(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        with torch.no_grad():
            for layer, load in loads.items():
                bias = params[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
                bias += t["bias_update"] * torch.sign(load.float().mean() - load.float())
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if state_path is not None and (step + 1) % save_every == 0 and step + 1 < t["steps"]:
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({"recipe": json.dumps(t, sort_keys=True), "step": step + 1, "opt": opt.state_dict(),
                        "params": {k: v.detach() for k, v in params.items()}, "rng": g.get_state(),
                        "history": history}, tmp)  # fmt: skip
            os.replace(tmp, state_path)
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    imbalance = {layer: (load.max().item() / load.float().mean().item()) for layer, load in loads.items()}
    return {"loss_first": history[0], "loss_last": sum(history[-10:]) / 10, "max_over_mean_expert_load": imbalance,
            "loss_history": history}  # fmt: skip


# ---------------------------------------------------------------------------- build
def build(out: str | Path, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Build mini-K2 under `out` (model-fp8/, model-bf16/, build.json); reuse a finished build."""
    out = Path(out)
    info_path = out / "build.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("recipe") == recipe_hash() and (out / "model-fp8" / "model.safetensors.index.json").exists():
            echo(f"mini-K2: reusing {out}")
            _update_chat_template(out)
            return dict(info, fp8=str(out / "model-fp8"), bf16=str(out / "model-bf16"))
    t0 = time.time()
    torch.manual_seed(TRAIN["seed"])
    out.mkdir(parents=True, exist_ok=True)
    train_docs, heldout_docs = corpus()
    # tokenizer: trained on the first characters of an interleaving of the training documents
    sample, size = [], 0
    for d in train_docs[:: max(1, len(train_docs) // 64)] + train_docs[-8:]:
        sample.append(d)
        size += len(d)
        if size > TRAIN["tokenizer_chars"]:
            break
    tok_dir = out / "tokenizer"
    ranks = train_bpe(sample, NUM_BASE_TOKENS)
    if len(ranks) != NUM_BASE_TOKENS:
        raise RuntimeError(f"tokenizer training found only {len(ranks)} tokens in {size} characters")
    save_tokenizer(tok_dir, ranks, chat_template=K2_CHAT_TEMPLATE)
    tok = load_tokenizer(tok_dir)
    echo(f"mini-K2: tokenizer of {tok.vocab_size} tokens trained on {size / 1e6:.1f}M characters")
    train_stream = token_stream(tok, train_docs)
    heldout_stream = token_stream(tok, heldout_docs)
    cfg_dict = config_dict()
    cfg = K2Config.from_dict(cfg_dict)
    params = init_params(cfg, TRAIN["seed"])
    n_params = sum(p.numel() for p in params.values())
    echo(
        f"mini-K2: {n_params / 1e6:.1f}M parameters, {len(train_stream) / 1e6:.2f}M training tokens, "
        f"{len(heldout_stream) / 1e6:.2f}M held-out tokens"
    )
    eval_model = K2Model(cfg, DictWeights(params))
    ppl_before = perplexity(eval_model, heldout_stream, TRAIN["seq"])
    stats = train(cfg, params, train_stream, progress)
    stats.pop("loss_history")
    ppl_after = perplexity(eval_model, heldout_stream, TRAIN["seq"])
    echo(f"mini-K2: held-out perplexity {ppl_before:.1f} before training, {ppl_after:.1f} after")
    save_release(out, cfg_dict, {k: v.detach() for k, v in params.items()}, tok_dir)
    info = {
        "recipe": recipe_hash(),
        "params": n_params,
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "tokens_seen": TRAIN["steps"] * TRAIN["batch"] * TRAIN["seq"],
        "heldout_ppl_before": ppl_before,
        "heldout_ppl_after": ppl_after,
        **stats,
        "seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "fp8": str(out / "model-fp8"),
        "bf16": str(out / "model-bf16"),
    }
    write_json(info_path, info)
    return info


def save_release(out: Path, cfg_dict: dict, state: dict[str, torch.Tensor], tok_dir: Path) -> None:
    """Write `state` as K2 ships it (out/model-fp8/, block-FP8 with scales) and as BF16
    (out/model-bf16/), four shards each with an index, the tokenizer's files beside each."""
    for name, fp8 in (("model-fp8", True), ("model-bf16", False)):
        d = out / name
        c = dict(cfg_dict)
        if not fp8:
            c.pop("quantization_config")
        save_checkpoint(d, c, dict(release_tensors(state, fp8=fp8)), num_shards=4, style="k2")
        for f in sorted(tok_dir.iterdir()):
            (d / f.name).write_bytes(f.read_bytes())


def _update_chat_template(out: Path) -> None:
    """Give a reused build's tokenizer_config.json files K2's current chat template.

    The template decides no weight (unlike the training text, see `_chat_v1`), so a build whose
    template is older is brought up to date in place rather than retrained under a new
    RECIPE_VERSION: each file whose template differs is rewritten (temporary file, then rename)
    exactly as `save_tokenizer` writes it now, so a reused build and a fresh one are byte-identical."""
    for d in (out / "tokenizer", out / "model-fp8", out / "model-bf16"):
        path = d / CONFIG_FILE
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if cfg.get("chat_template") == K2_CHAT_TEMPLATE:
            continue
        cfg["chat_template"] = K2_CHAT_TEMPLATE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def default_dir() -> Path:
    """Where mini-K2 is cached: $K2QUANT_HOME/mini-k2 or ~/.cache/k2quant/mini-k2."""
    home = os.environ.get("K2QUANT_HOME") or Path.home() / ".cache" / "k2quant"
    return Path(home) / "mini-k2"
