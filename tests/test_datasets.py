"""The held-out evaluation text (calib/heldout/) is disjoint from mini-K2's training text and from
every calibration set the project uses, and long enough for the tests and benches."""

from __future__ import annotations

from k2quant import minik2
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
    for name, docs in (("mini-K2 training", train), ("calibration", bundled_documents(generated=True))):
        corpus = " ".join(" ".join(d.split()) for d in set(docs))
        found = [p for p in pieces if p in corpus]
        assert not found, f"held-out text found in the {name} text: {found[:3]}"


def test_heldout_text_is_long_enough_for_the_benches(mini_k2):
    ids = load_tokenizer(mini_k2["fp8"]).encode(heldout_text())
    assert len(ids) >= 4 * 512, len(ids)  # bench/gptq.py and bench/gguf_imatrix.py score 4 chunks of 512
