"""The held-out evaluation text (calib/heldout/) is disjoint from mini-K2's training text and from
every calibration set the project uses, and long enough for the tests and benches."""

from __future__ import annotations

from k2quant import minik2, minik2_bench
from k2quant.calib.datasets import bundled_documents, heldout_text
from k2quant.formats.tokenizer import load_tokenizer


def _pieces(text: str, width: int = 40) -> list[str]:
    """Every paragraph's runs of `width` characters (non-overlapping), stripped of surrounding space."""
    out = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        out += [para[i : i + width] for i in range(0, len(para) - width + 1, width)]
    return out


def test_heldout_text_is_in_neither_training_nor_calibration():
    held = heldout_text()
    pieces = _pieces(held)
    assert len(pieces) > 200
    train, heldout_docs = minik2.corpus()
    bench_train, _ = minik2_bench.corpus()
    for name, docs in (("mini-K2 training", train), ("bench mini-K2 training", bench_train),
                       ("calibration", bundled_documents(generated=True))):  # fmt: skip
        corpus = " ".join(" ".join(d.split()) for d in set(docs))
        found = [p for p in pieces if p in corpus]
        assert not found, f"held-out text found in the {name} text: {found[:3]}"


def test_heldout_text_is_long_enough_for_the_benches(mini_k2):
    ids = load_tokenizer(mini_k2["fp8"]).encode(heldout_text())
    assert len(ids) >= 4 * 512, len(ids)  # bench/gptq.py and bench/gguf_imatrix.py score 4 chunks of 512


def test_bench_model_trains_on_more_text_and_never_on_the_demo_held_out_text():
    train, heldout = minik2.corpus()
    bench_train, bench_heldout = minik2_bench.corpus()
    assert bench_heldout == heldout and bench_train[: len(train)] == train
    assert sum(map(len, bench_train)) > 2 * sum(map(len, train))
    assert not set(bench_train) & set(heldout)
