"""llama.cpp importance-matrix files (GGUF imatrix), read and written.

Per weight tensor W (llama.cpp's names): `W.in_sum2` F32 [nmat, n_in], the raw sum of x^2
per input column over every activation row that reached the matrix, and `W.counts` F32
[nmat, 1], the rows per matrix; nmat is the number of experts for the stacked `*_exps`
tensors and 1 otherwise. KV: general.type "imatrix", imatrix.datasets, chunk_count,
chunk_size. llama-quantize divides in_sum2 by counts (a count of 0 means weight 1);
`read_importance` does the same, keyed by checkpoint module name.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from k2quant.errors import K2QuantError

from .gguf import check_gguf, checkpoint_linear, gguf_linear


class ImatrixError(K2QuantError):
    pass


def write_imatrix(
    path: str | Path,
    in_sum2: dict[str, torch.Tensor],
    counts: dict[str, int],
    n_experts: int,
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> None:
    """Write per-module statistics (checkpoint names) as a llama.cpp imatrix GGUF, atomically."""
    import gguf

    stacks: dict[str, dict[int | None, str]] = defaultdict(dict)
    for module in in_sum2:
        target = gguf_linear(module)
        if target is not None:
            stacks[target[0]][target[1]] = module
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="deepseek2")
    w.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry no architecture
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(stacks):
        members = stacks[name]
        if None in members:  # per-head sums (attn_k_b / attn_v_b) are flattened: one row of heads x d, one count,
            sums = [in_sum2[members[None]].flatten()]  # as llama-imatrix writes a dense 3-D tensor
            cnts = [counts[members[None]]]
        else:
            n_in = next(iter(in_sum2[m] for m in members.values())).numel()
            sums = [in_sum2[members[e]] if e in members else torch.zeros(n_in) for e in range(n_experts)]
            cnts = [counts.get(members.get(e, ""), 0) for e in range(n_experts)]
        w.add_tensor(f"{name}.in_sum2", torch.stack([s.float() for s in sums]).numpy())
        w.add_tensor(f"{name}.counts", np.array(cnts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def _open_imatrix(path: str | Path):
    import gguf

    header = check_gguf(path, ImatrixError)  # gguf-py trusts the header's counts and lengths
    kind = header.kv.get("general.type")
    if kind != "imatrix":
        raise ImatrixError(f"{path}: general.type is {kind!r}, not 'imatrix'")
    try:
        r = gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ImatrixError(f"{path}: not a readable GGUF file ({e})") from None
    return r


def _sums_and_counts(path, t, c) -> tuple[np.ndarray, np.ndarray]:
    """(in_sum2 [nmat, n_in], counts [nmat]) of one matrix's F32 tensors, checked against each other."""
    for x in (t, c):
        if x.tensor_type.name != "F32":
            raise ImatrixError(f"{path}: tensor '{x.name}' is {x.tensor_type.name}, not F32")
    cnt = np.asarray(c.data, dtype=np.float64).reshape(-1)
    sums = np.asarray(t.data)
    if not len(cnt) or sums.size % len(cnt):
        raise ImatrixError(f"{path}: tensor '{t.name}' ({sums.size} values) does not split into the "
                           f"{len(cnt)} matrices of '{c.name}'")  # fmt: skip
    if not ((cnt >= 0) & (cnt < 2**53)).all() or not np.isfinite(sums).all():
        raise ImatrixError(f"{path}: tensor '{t.name}' or '{c.name}' holds NaN, Inf or a count that cannot be")
    return sums.reshape(len(cnt), -1), cnt


def read_imatrix_gguf(path: str | Path, names: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(in_sum2 [nmat, n_in], counts [nmat]) per GGUF tensor name, for the `names` asked for
    (stacked experts and per-head tensors keep their nmat rows)."""
    r = _open_imatrix(path)
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for name in names:
        t, c = tensors.get(name + ".in_sum2"), tensors.get(name + ".counts")
        if t is None:
            continue
        if c is None:
            raise ImatrixError(f"{path}: tensor '{name}.in_sum2' has no matching '{name}.counts'")
        sums, cnt = _sums_and_counts(path, t, c)
        out[name] = (np.asarray(sums, dtype=np.float32), cnt)
    return out


def read_imatrix(path: str | Path, modules: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(in_sum2, counts) per checkpoint module from an imatrix GGUF (k2quant's or llama.cpp's);
    only `modules` when given (the file is memory-mapped, so reading a few is cheap)."""
    r = _open_imatrix(path)
    tensors = {t.name: t for t in r.tensors}
    in_sum2: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname.removesuffix(".in_sum2")
        c = tensors.get(base + ".counts")
        if c is None:
            raise ImatrixError(f"{path}: tensor '{tname}' has no matching '{base}.counts'")
        sums, cnt = _sums_and_counts(path, t, c)
        sums = np.asarray(sums, dtype=np.float64)
        for e in range(len(cnt)):
            module = checkpoint_linear(base, e if len(cnt) > 1 or "_exps" in base else None)
            if module is None or (modules is not None and module not in modules):
                continue
            in_sum2[module] = torch.from_numpy(sums[e].copy())
            counts[module] = int(cnt[e])
    return in_sum2, counts


def importance(in_sum2: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Mean x^2 per input channel (llama-quantize's column weights); 1 where a matrix saw no data."""
    out = {}
    for module, s in in_sum2.items():
        n = counts.get(module, 0)
        out[module] = (s / n).float() if n > 0 else torch.ones_like(s, dtype=torch.float32)
    return out
