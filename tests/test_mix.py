"""Size-targeted GGUF mixes (convert --to gguf --target-size / --bpw): under the target, by how much,
reproducible from the recipe file they write, and run by llama.cpp like k2quant's forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from k2quant import open_checkpoint, open_model
from k2quant.calib.datasets import heldout_text
from k2quant.cli import main
from k2quant.formats.tokenizer import load_tokenizer
from k2quant.mix import Group, MixError, allocate, plan_mix
from k2quant.plan import gguf_sizes, resolve_model

from .llamacpp import SETTING, llama_logits


def _gguf_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.gguf"))


def test_allocation_takes_the_most_error_per_byte_and_stays_under_budget():
    a = Group("attention", 0, [], {"Q2_K": (100, 9.0), "Q4_K": (200, 2.0), "Q8_0": (400, 1.5)})
    b = Group("routed_down", 0, [], {"Q2_K": (100, 5.0), "Q4_K": (200, 4.0), "Q8_0": (400, 0.5)})
    c = Group("output", None, [], {"Q2_K": (100, 3.0), "Q3_K": (150, 3.5), "Q8_0": (400, 0.1)})  # Q3_K: dominated
    assert allocate([a, b, c], 300) <= 300 and (a.type, b.type, c.type) == ("Q2_K", "Q2_K", "Q2_K")
    assert allocate([a, b, c], 400) == 400 and (a.type, b.type, c.type) == ("Q4_K", "Q2_K", "Q2_K")
    used = allocate([a, b, c], 1000)
    assert used <= 1000 and c.type != "Q3_K"
    with pytest.raises(MixError, match="smallest mix needs 300 bytes"):
        allocate([a, b, c], 299)


@pytest.mark.parametrize("target", [240_000_000_000, 300 * 2**30, "2.2", "3.5"])
def test_k2_mix_lands_within_1_percent_under_the_target(target):
    """At K2's size, from the header-only inventory of its config (prior sensitivity, planned as with
    an imatrix): the file (or its tensor data, for --bpw) is under the target by at most 1%."""
    ck = resolve_model("kimi-k2-instruct").checkpoint
    if isinstance(target, str):
        mix = plan_mix(ck, bpw=float(target), sensitivity="prior", assume_imatrix=True)
        got, want = mix.data_bytes, mix.target_bytes
    else:
        mix = plan_mix(ck, target_size=target, sensitivity="prior", assume_imatrix=True)
        got, want = mix.file_bytes, target
        assert sum(gguf_sizes(_plan(ck, mix), ck.config.vocab_size)[1]) == got
    assert 0.99 * want <= got <= want, (got, want)
    types = {g.cls: g.type for g in mix.groups}
    assert types["routed_gate_up"] != types["attention"]  # the experts low, what every token passes high


def _plan(ck, mix):
    from k2quant.convert_gguf import plan_gguf

    return plan_gguf(ck, mix.recipe(), "rtn", "x", 0, True)


def test_mix_on_mini_k2_is_under_the_target_reproducible_and_runs_in_llama_cpp(mini_k2, imatrix, tmp_path):
    """--bpw and --target-size on mini-K2 with calibrate's imatrix (measured sensitivity): the file is
    under the target by at most 2% (one type step of one class is coarse at this size); the
    recipe.toml it writes makes the same bytes through --recipe (with --method rtn, the mix's default);
    llama.cpp runs it like k2quant."""
    src = mini_k2["fp8"]
    runner = CliRunner()
    out = tmp_path / "bpw"
    r = runner.invoke(main, ["convert", str(src), str(out), "--to", "gguf", "--bpw", "2.5", "--imatrix", str(imatrix),
                             "--name", "mix", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["method"] == "rtn"  # a mix's default: llama.cpp's procedures, which its plan measured
    mix = summary["mix"]
    path = next(out.glob("*.gguf"))
    ck = open_checkpoint(path)
    data = sum(t.n_bytes for t in ck.readers[0].tensors)
    params = sum(int(t.n_elements) for t in ck.readers[0].tensors)
    assert data == mix["data_bytes"] and 0.98 * 2.5 <= 8 * data / params <= 2.5, (data, params)
    types = {g["type"] for g in mix["groups"]}
    assert len(types) >= 3, types  # a mix, not one type
    again = tmp_path / "again"
    r = runner.invoke(main, ["convert", str(src), str(again), "--to", "gguf", "--recipe", str(out / "recipe.toml"),
                             "--imatrix", str(imatrix), "--method", "rtn", "--name", "mix"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert path.read_bytes() == next(again.glob("*.gguf")).read_bytes()
    r = runner.invoke(main, ["verify", str(out), "--json"])  # recipe.toml in the manifest, the mix in the summary
    assert r.exit_code == 0 and not json.loads(r.output)["unlisted"], r.output
    assert json.loads((out / "k2quant_convert.json").read_text())["mix"]["data_bytes"] == data

    size = int(0.8 * _gguf_bytes(out))
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "size"), "--to", "gguf", "--target-size", str(size),
                             "--imatrix", str(imatrix), "--method", "rtn", "--split-max-size", "5M"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "mix for" in r.output and "routed_gate_up" in r.output
    assert len(list((tmp_path / "size").glob("*.gguf"))) > 1  # every file's header counted
    assert 0.98 * size <= _gguf_bytes(tmp_path / "size") <= size

    text = heldout_text()
    tokens = load_tokenizer(mini_k2["fp8"]).encode(text)[:512]
    model = open_model(path)
    rope = model.config.rope
    theirs = llama_logits(path, tokens, 512, rope.beta_fast, rope.beta_slow)
    ours = model.logits(torch.tensor([tokens]))[0].float()
    lp, lq = torch.log_softmax(ours.double(), -1), torch.log_softmax(torch.from_numpy(theirs).double(), -1)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    print(f"mix {summary['mix']['bits_per_weight']:.3f} bpw: llama.cpp vs k2quant KLD {kld:.6f} ({SETTING})")
    assert kld <= 0.02, (kld, SETTING)


def test_mix_options_are_checked(mini_k2, tmp_path):
    runner = CliRunner()
    src = str(mini_k2["fp8"])
    r = runner.invoke(main, ["convert", src, str(tmp_path / "a"), "--to", "gguf", "--bpw", "2.5", "--preset", "q4_k_m"])
    assert r.exit_code != 0 and "leave out --preset" in r.output
    r = runner.invoke(main, ["convert", src, str(tmp_path / "a"), "--bpw", "2.5"])
    assert r.exit_code != 0 and "--to gguf" in r.output
    r = runner.invoke(main, ["convert", src, str(tmp_path / "a"), "--to", "gguf", "--bpw", "x"])
    assert r.exit_code != 0 and "--bpw 'x'" in r.output
    r = runner.invoke(main, ["convert", src, str(tmp_path / "a"), "--to", "gguf", "--target-size", "1M"])
    assert r.exit_code != 0 and "smallest mix needs" in r.output  # no imatrix: Q2_K is the floor
    assert not (tmp_path / "a").exists()
