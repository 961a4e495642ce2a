"""Writing Hugging Face-style sharded safetensors checkpoints (config, shards, index).

Used for checkpoints k2quant builds itself (mini-K2, test fixtures) in the official
layout. Each file is written to a temporary name and renamed when complete, and the
index last, so an interrupted write never looks like a finished checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2quant.formats.hashed import WrittenFile, atomic_write


def shard_name(i: int, n: int, style: str = "k2") -> str:
    """'k2': model-1-of-61.safetensors (K2-Instruct); 'hf': model-00001-of-000062.safetensors (0905, Thinking)."""
    if style == "k2":
        return f"model-{i}-of-{n}.safetensors"
    if style == "hf":
        return f"model-{i:05d}-of-{n:06d}.safetensors"
    raise ValueError(f"unknown shard naming {style!r}")


def write_json(path: Path, obj: object) -> WrittenFile:
    """`obj` as indented JSON, written via a temporary file (formats/hashed.py: hashed, fsynced, renamed)."""
    return atomic_write(path, [(json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")])


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: str | Path,
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    num_shards: int = 1,
    style: str = "k2",
) -> Path:
    """Write `tensors` in order into `num_shards` shards of about equal size, with an index.

    Tensors that share a module prefix (weight and its scales) stay in one shard.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    names = list(tensors)
    if num_shards <= 1:
        save_safetensors(out / "model.safetensors", tensors)
        return out
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    target = total / num_shards
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        module = name.rsplit(".", 1)[0]
        t = tensors[name]
        same_module = shards[-1] and shards[-1][-1].rsplit(".", 1)[0] == module
        if size >= target and len(shards) < num_shards and not same_module:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.numel() * t.element_size()
    while len(shards) < num_shards:  # tiny inputs: split the largest remaining shard
        big = max(range(len(shards)), key=lambda i: len(shards[i]))
        half = len(shards[big]) // 2
        if half == 0:
            break
        shards.insert(big + 1, shards[big][half:])
        shards[big] = shards[big][:half]
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, members in enumerate(shards, start=1):
        fname = shard_name(i, n, style)
        save_safetensors(out / fname, {k: tensors[k] for k in members})
        weight_map.update(dict.fromkeys(members, fname))
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out
