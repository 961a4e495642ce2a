"""Shared fixtures: tiny random K2-shaped checkpoints made with transformers' DeepseekV3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k2quant.formats.hf import save_checkpoint
from k2quant.release import FP8_QUANTIZATION_CONFIG, release_tensors

# a small K2 for synthetic checkpoints (every shape valid, not every width a multiple of 256)
SMALL = dict(
    vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
)  # fmt: skip
MEMORY_DIMS = dict(SMALL, hidden_size=1024, moe_intermediate_size=512, intermediate_size=1024, n_routed_experts=16,
                   vocab_size=2048)  # fmt: skip

TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=8,
    n_shared_experts=1,
    routed_scaling_factor=2.827,
    kv_lora_rank=96,
    q_lora_rank=128,
    qk_rope_head_dim=32,
    v_head_dim=32,
    qk_nope_head_dim=32,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
    num_nextn_predict_layers=0,
    rms_norm_eps=1e-6,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 50000.0,
    "factor": 32.0,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 64,
}
PLAIN_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def make_hf_model(seed: int = 0, yarn: bool = True, **overrides):
    """A DeepseekV3ForCausalLM with weights large enough that routing and attention matter."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(TINY, rope_parameters=dict(YARN if yarn else PLAIN_ROPE))
    kw.update(overrides)
    cfg = DeepseekV3Config(**kw)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
    return model


def hf_state_and_config(model, tmp: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-expert state dict and config.json as transformers saves them."""
    d = tmp / "hf-save"
    model.save_pretrained(d)
    state = load_file(str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    return state, config


def k2_style_config(config: dict) -> dict:
    """The same config as Kimi ships it: model_type kimi_k2 with legacy rope_theta + rope_scaling."""
    c = {k: v for k, v in config.items() if k not in ("rope_parameters", "head_dim", "qk_head_dim")}
    c["model_type"] = "kimi_k2"
    rp = dict(config["rope_parameters"])
    c["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.pop("rope_type")
    if rtype == "yarn":
        c["rope_scaling"] = {**rp, "type": "yarn"}
    return c


def write_checkpoint(
    out: Path, state: dict, config: dict, fp8: bool = False, shards: int = 1, style: str = "k2"
) -> Path:
    cfg = dict(config)
    if fp8:
        cfg["quantization_config"] = FP8_QUANTIZATION_CONFIG
    return save_checkpoint(out, cfg, dict(release_tensors(state, fp8=fp8)) if fp8 else state, shards, style)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(transformers model, per-expert state, config dict) of the default tiny model."""
    model = make_hf_model()
    state, config = hf_state_and_config(model, tmp_path_factory.mktemp("tiny"))
    return model, state, config


@pytest.fixture(scope="session")
def tiny_fp8_dir(tiny_hf, tmp_path_factory) -> Path:
    _, state, config = tiny_hf
    return write_checkpoint(
        tmp_path_factory.mktemp("fp8") / "ckpt", state, k2_style_config(config), fp8=True, shards=12
    )


@pytest.fixture(scope="session")
def mini_k2(tmp_path_factory):
    """mini-K2 built once per session (a few minutes on 2 cores); $K2QUANT_HOME reuses a cached build."""
    import os

    from k2quant import minik2

    root = minik2.default_dir() if os.environ.get("K2QUANT_HOME") else tmp_path_factory.mktemp("minik2") / "mini-k2"
    info = minik2.build(root, echo=lambda s: None, progress=False)
    return {"info": info, "fp8": Path(info["fp8"]), "bf16": Path(info["bf16"])}


@pytest.fixture(scope="session")
def imatrix(mini_k2, tmp_path_factory) -> Path:
    """k2quant calibrate's imatrix.gguf of mini-K2 (2048 tokens)."""
    from click.testing import CliRunner

    from k2quant.cli import main

    out = tmp_path_factory.mktemp("calib")
    r = CliRunner().invoke(main, ["calibrate", str(mini_k2["fp8"]), "--out", str(out), "--tokens", "2048", "--ctx",
                                  "128", "--min-expert-tokens", "8"])  # fmt: skip
    assert r.exit_code == 0, r.output
    return out / "imatrix.gguf"


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory) -> Path:
    """The project's held-out evaluation text (calib/heldout/) as one file, for `--data`."""
    from k2quant.calib.datasets import heldout_text

    p = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    p.write_text(heldout_text(), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def two_sizes(tmp_path_factory) -> list[Path]:
    """The same synthetic FP8 model with 2 and with 10 layers (about 37 MB and 243 MB): for memory tests."""
    from k2quant.synthetic import k2_config_dict, write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("sizes")
    return [write_synthetic_checkpoint(root / f"l{n}", k2_config_dict(**{**MEMORY_DIMS, "num_hidden_layers": n}), n)
            for n in (2, 10)]  # fmt: skip


def assert_peak_rss_independent_of_size(two_sizes: list[Path], script: str, tmp: Path,
                                        env: dict[str, str] | None = None) -> list[int]:  # fmt: skip
    """Run `script SRC TMP/x` in a fresh process on both sizes; its last output line is its peak RSS.

    The larger model may cost at most a quarter of its extra bytes: holding it (even only its
    stored bytes) would cost all of them, dequantized four times as much; the quarter leaves room
    for the allocator's run-to-run noise (about 30 MB on these sizes)."""
    import os
    import subprocess
    import sys

    peaks, sizes = [], []
    for i, src in enumerate(two_sizes):
        sizes.append(sum(p.stat().st_size for p in src.glob("*.safetensors")))
        r = subprocess.run([sys.executable, "-c", script, str(src), str(tmp / f"run{i}")], capture_output=True,
                           text=True, check=True, env={**os.environ, **(env or {})})  # fmt: skip
        peaks.append(int(r.stdout.split()[-1]))
    assert sizes[1] > 4 * sizes[0]
    assert peaks[1] - peaks[0] < 0.25 * (sizes[1] - sizes[0]), (peaks, sizes)
    return peaks


def wait_for_state(proc, state: Path, field: str, n: int, what: str) -> None:
    """Until a resumable run's state file (`state`, JSON) says `field` >= n, while `proc` runs (n = 0:
    until the state exists); fails naming `what` when the run ends or stalls first."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())[field] >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"{what} ended or stalled before {n} were done: {proc.communicate()}")
