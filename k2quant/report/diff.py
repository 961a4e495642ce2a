"""`k2quant diff`: run a reference and a candidate side by side, layer by layer, and measure what was lost.

Evaluation follows llama-perplexity: chunks of ctx tokens, the second half of each chunk
scored. Both models are layer-streamed through the one forward (model.py): at layer L the
reference computes its output, and the candidate's layer runs twice: on the reference's
input to that layer (how much this layer alone loses) and on its own free-running state
(how much has accumulated), each with the reference's batch shape so that a model diffed
against itself agrees bit for bit. Per-layer errors, router agreement and final-logit
statistics come from one pass, holding one tensor group's weights at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from k2quant.calib.datasets import load_texts
from k2quant.formats.tokenizer import load_tokenizer

from ..checkpoint import open_checkpoint
from ..errors import K2QuantError
from ..model import K2Model, open_model
from ..names import parse_name
from .diff_state import DiffProgress, DiffState, diff_key
from .metrics import summarize, token_quantities
from .render import write_report


class DiffError(K2QuantError):
    pass


def load_tokens(paths: list[str | Path], tokenizer_dir: str | Path) -> torch.Tensor:
    """Token ids from text (.txt, .jsonl: tokenized with the model's tokenizer) or pre-tokenized
    (.npy or .json: a flat list of ids) files, concatenated."""
    ids: list[int] = []
    tok = None
    for p in map(Path, paths):
        if not p.is_file():
            raise DiffError(f"{p}: data file not found")
        if p.suffix == ".npy":
            ids.extend(_npy_ids(p))
        elif p.suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an int of 5000 digits
                raise DiffError(f"{p}: not valid JSON ({e})") from None
            if not (isinstance(data, list) and all(type(i) is int for i in data)):
                raise DiffError(f"{p}: a .json data file must be a flat list of token ids")
            bad = next((i for i in data if not 0 <= i < 2**63), None)
            if bad is not None:
                raise DiffError(f"{p}: {bad} is not a token id")
            ids.extend(data)
        else:
            if tok is None:
                d = Path(tokenizer_dir)
                d = d if d.is_dir() else d.parent  # a GGUF file: the tokenizer beside it, as `run` reads it
                try:
                    tok = load_tokenizer(d)
                except FileNotFoundError:
                    raise DiffError(f"{d}: no tiktoken.model to tokenize {p} with; pass token ids (.npy or .json), "
                                    "or put the release's tiktoken.model beside the GGUF") from None  # fmt: skip
            for doc in load_texts([p]):
                ids.extend(tok.encode(doc))
    return torch.tensor(ids, dtype=torch.long)


def _npy_ids(p: Path) -> list[int]:
    """A .npy file of integer token ids. Its header is checked first: numpy allocates the array the header
    describes before reading, so a shape that lies would cost that memory."""
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            data_bytes = p.stat().st_size - f.tell()
    except Exception as e:  # numpy's header parser raises ValueError, TypeError, tokenize.TokenError, ...
        raise DiffError(f"{p}: not a .npy file numpy can read ({type(e).__name__}: {e})") from None
    if dtype.kind not in "iu":
        raise DiffError(f"{p}: a .npy data file must hold integer token ids, not {dtype}")
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > data_bytes:
        raise DiffError(f"{p}: header's shape {list(shape)} of {dtype} does not fit the {data_bytes} bytes of data")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DiffError(f"{p}: not a .npy file numpy can read ({e})") from None
    if arr.size and (arr.min() < 0 or int(arr.max()) >= 2**63):
        raise DiffError(f"{p}: {int(arr.min()) if arr.min() < 0 else int(arr.max())} is not a token id")
    return arr.astype(np.int64).ravel().tolist()


def _check_compatible(ref: K2Model, cand: K2Model) -> None:
    a, b = ref.config, cand.config
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "num_attention_heads"):
        if getattr(a, f) != getattr(b, f):
            raise DiffError(f"config field '{f}' differs: reference {getattr(a, f)}, candidate {getattr(b, f)}")


def run_diff(
    ref_path: str | Path,
    cand_path: str | Path,
    data: list[str | Path],
    ctx: int = 512,
    chunks: int | None = None,
    batch: int = 4,
    progress: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
) -> dict:
    """Compare two models on the data; returns the metrics dictionary (see metrics.json). With `out`,
    the report is written there too, and the run keeps a resumable state in `out` as each batch of
    chunks finishes (diff_state.py): `resume` finishes an interrupted run, to the same metrics."""
    ref, cand = open_model(ref_path), open_model(cand_path)  # layer-streamed: nothing stays resident
    _check_compatible(ref, cand)
    tokens = load_tokens(data, ref_path)
    if tokens.numel() and int(tokens.max()) >= ref.config.vocab_size:
        raise DiffError(f"token id {int(tokens.max())} is outside the vocabulary ({ref.config.vocab_size})")
    n_chunks = tokens.numel() // ctx
    if chunks:
        n_chunks = min(n_chunks, chunks)
    if n_chunks < 1:
        raise DiffError(f"{tokens.numel()} tokens are fewer than one chunk of --ctx {ctx}")
    x_all = tokens[: n_chunks * ctx].view(n_chunks, ctx)
    c = ref.config
    L = c.num_hidden_layers
    first = ctx // 2  # positions first .. ctx-2 predict tokens first+1 .. ctx-1
    batches = (n_chunks + batch - 1) // batch
    state = None
    if out is not None:
        key = diff_key(Path(ref_path), Path(cand_path), x_all, {"ctx": ctx, "chunks": n_chunks, "batch": batch})
        state = DiffState(Path(out), key, L, c.n_routed_experts, batches)
        p = state.open(resume)
    else:
        p = DiffProgress.start(L, c.n_routed_experts)
    acc = p.layer
    per_token = {k: [v] for k, v in p.per_token.items()}
    captured: dict[str, torch.Tensor] = {}
    ref.route_observer = lambda layer, s, ids, w: captured.__setitem__("ref", ids)
    cand.route_observer = lambda layer, s, ids, w: captured.__setitem__("cand", ids)
    bar = tqdm(total=n_chunks, initial=min(n_chunks, p.batches * batch), desc="diff", unit="chunk",
               disable=not progress)  # fmt: skip
    with torch.no_grad():
        for b0 in range(p.batches * batch, n_chunks, batch):
            x = x_all[b0 : b0 + batch]
            nb = x.shape[0]
            pos = torch.arange(ctx)
            h_ref = ref.embed(x)
            h_free = cand.embed(x)
            for i in range(L):
                captured.clear()
                out_ref = ref.layer(i, h_ref, pos)
                c_ids = None
                if c.is_moe(i):
                    r_ids = captured["ref"]
                # two calls with the reference's batch shape, so a model diffed against itself gives exactly 0
                teacher = cand.layer(i, h_ref, pos)
                if c.is_moe(i):
                    c_ids = captured["cand"]
                h_free = cand.layer(i, h_free, pos)
                for name, h in (("teacher", teacher), ("free", h_free)):
                    d = (h - out_ref).double()
                    acc[f"{name}_err2"][i] += d.pow(2).sum().item()
                    acc[f"{name}_cos"][i] += F.cosine_similarity(h.double(), out_ref.double(), dim=-1).sum().item()
                acc["ref2"][i] += out_ref.double().pow(2).sum().item()
                if c_ids is not None:  # router choices on the same input
                    agree = (r_ids[:, :, None] == c_ids[:, None, :]).any(-1).double().sum().item()
                    acc["route_agree"][i] += agree
                    acc["route_total"][i] += r_ids.numel()
                    p.expert_counts[i] += torch.bincount(r_ids.flatten(), minlength=c.n_routed_experts).double()
                h_ref = out_ref
            p.n_vec += nb * ctx
            lr = ref.head(h_ref)[:, first : ctx - 1].reshape(-1, c.vocab_size).float()
            lc = cand.head(h_free)[:, first : ctx - 1].reshape(-1, c.vocab_size).float()
            tq = token_quantities(lr, lc, x[:, first + 1 :].reshape(-1))
            for k, v in tq.items():
                per_token[k].append(v)
            p.batches += 1
            if state is not None:
                p.per_token = {k: torch.cat(v) for k, v in per_token.items()}
                per_token = {k: [v] for k, v in p.per_token.items()}
                state.save(p)
            bar.update(nb)
    bar.close()
    q = {k: torch.cat(v) for k, v in per_token.items()}
    metrics = summarize(q)
    metrics["ctx"] = ctx
    metrics["chunks"] = n_chunks
    metrics["reference"] = str(ref_path)
    metrics["candidate"] = str(cand_path)
    ref2 = acc["ref2"].clamp(min=1e-30)
    metrics["per_layer"] = [
        {
            "layer": i,
            "moe": c.is_moe(i),
            "rel_err_teacher": (acc["teacher_err2"][i] / ref2[i]).sqrt().item(),
            "rel_err_free": (acc["free_err2"][i] / ref2[i]).sqrt().item(),
            "cos_teacher": (acc["teacher_cos"][i] / p.n_vec).item(),
            "cos_free": (acc["free_cos"][i] / p.n_vec).item(),
        }
        for i in range(L)
    ]
    agree, total = acc["route_agree"], acc["route_total"]
    metrics["router"] = {
        "topk_agreement": (agree.sum() / total.sum()).item() if total.sum() else 1.0,
        "per_layer": {str(i): (agree[i] / total[i]).item() for i in range(L) if total[i]},
    }
    metrics["per_tensor"], metrics["per_expert"] = weight_errors(ref_path, cand_path, p.expert_counts, progress)
    metrics["kld_values"] = q["kld"].float().tolist()  # for the distribution plot
    if state is not None:
        write_report(metrics, out)
        state.finish()
    return metrics


def weight_errors(ref_path, cand_path, expert_counts: torch.Tensor, progress: bool) -> tuple[list, list]:
    """Per linear tensor: SNR in dB and the candidate's bits per weight; per routed expert: the
    relative weight error over gate/up/down and the reference's routing frequency."""
    ref, cand = open_checkpoint(ref_path), open_checkpoint(cand_path)
    per_tensor = []
    expert_err: dict[tuple[int, int], list[float]] = {}
    names = [n for n in ref.names() if parse_name(n).is_linear and n in cand]
    for name in tqdm(names, desc="weights", unit="tensor", disable=not progress):
        w = ref.tensor(name).double()
        d = cand.tensor(name).double() - w
        sig, noise = w.pow(2).sum().item(), d.pow(2).sum().item()
        info = cand.info(name)
        ni = parse_name(name)
        per_tensor.append({
            "name": name, "component": ni.component, "scheme": info.storage,
            "snr_db": 10 * np.log10(sig / noise) if noise > 0 else float("inf"),
            "bits_per_weight": 8 * info.stored_bytes / info.numel, "params": info.numel,
        })  # fmt: skip
        if ni.component == "routed_experts":
            acc = expert_err.setdefault((ni.layer, ni.expert), [0.0, 0.0])
            acc[0] += noise
            acc[1] += sig
    totals = expert_counts.sum(-1, keepdim=True).clamp(min=1)
    freq = expert_counts / totals
    per_expert = [
        {
            "layer": layer,
            "expert": e,
            "rel_err": float(np.sqrt(n / max(s, 1e-30))),
            "frequency": freq[layer, e].item(),
            "tokens": int(expert_counts[layer, e].item()),
        }  # fmt: skip
        for (layer, e), (n, s) in sorted(expert_err.items())
    ]
    return per_tensor, per_expert
