"""Fuzzed, not just sampled: every reader of a file k2quant takes from a user, against mutated files.

For each reader (tests/fuzzing.py: READERS), valid files made here are mutated by hypothesis
(bytes flipped, cut or inserted; JSON values replaced; lying lengths, counts, types, dims and
offsets in binary headers; lines of text formats edited) and read in a worker process under an
address-space limit, with a time limit per case and an audit hook on every file opened. Each case
must open and read, or raise a K2QuantError naming a file of the case: never another exception, a
hang, memory sized by a lying field, or a read outside the model's directory. Deterministic
(derandomize=True, no example database); bench/fuzz.py runs thousands of cases per reader.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import fuzzing

CASES = int(os.environ.get("K2QUANT_FUZZ_CASES", "200"))


@pytest.fixture(scope="module")
def worker():
    w = fuzzing.Worker(fuzzing.make_bases())
    w.start()
    yield w
    w.close()


def test_every_reader_opens_its_valid_files(worker):
    """The files the cases are made from are valid: every reader opens and reads them."""
    assert set(worker.warm) == set(fuzzing.READERS)
    bad = {name: detail for name, (status, detail) in worker.warm.items() if status != "opened"}
    assert not bad, bad


@pytest.mark.parametrize("name", list(fuzzing.READERS))
def test_mutated_files_open_or_raise_a_k2quant_error_naming_the_file(worker, name):
    reader = fuzzing.READERS[name]
    base = worker.bases[reader.base]
    seen = {"opened": 0, "refused": 0, "failed": 0}

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(st.data())
    def run(data):
        case = data.draw(fuzzing.case_strategy(reader), label="case")
        out = worker.run(name, fuzzing.mutate(reader, base, case))
        seen[out.status] += 1
        assert out.ok, f"{name}: {out.status}: {out.detail}\n  case: {fuzzing.describe(case)}"

    run()
    assert sum(seen.values()) >= CASES, seen
