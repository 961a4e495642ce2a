"""Fuzz k2quant's readers with many more cases than the test suite: a table of outcomes per reader.

The same readers, valid files, mutations and worker as tests/test_fuzz.py (tests/fuzzing.py): each
case must open and read, or raise a K2QuantError naming a file of the case, within the time limit,
under the address-space limit and without opening a file outside the case's directory. Failing
cases are written, files and outcome, under --save (one directory per case).

Usage: python bench/fuzz.py [--cases 5000] [--readers gguf,recipe] [--seed 0] [--save DIR] [--timeout 30]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import fuzzing  # noqa: E402


def fuzz_reader(worker: fuzzing.Worker, name: str, cases: int, seed_: int, save: Path) -> dict:
    reader = fuzzing.READERS[name]
    base = worker.bases[reader.base]
    seen: collections.Counter = collections.Counter()
    failures: list[str] = []
    t0 = time.perf_counter()

    @seed(seed_)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.data())
    def run(data):
        case = data.draw(fuzzing.case_strategy(reader))
        files = fuzzing.mutate(reader, base, case)
        out = worker.run(name, files)
        seen[out.status] += 1
        if not out.ok:
            d = fuzzing.save_case(save, reader, base, files, case, out)
            failures.append(f"{d}: {out.detail[:300]}")

    run()
    return {"reader": name, "cases": sum(seen.values()), "opened": seen["opened"], "refused": seen["refused"],
            "failed": seen["failed"], "seconds": time.perf_counter() - t0, "failures": failures}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5000, help="cases per reader")
    ap.add_argument("--readers", help=f"comma-separated subset of: {', '.join(fuzzing.READERS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="where failing cases are written (default: a new temporary directory)")
    ap.add_argument("--timeout", type=float, default=fuzzing.CASE_TIMEOUT, help="seconds per case before a hang")
    args = ap.parse_args()
    names = args.readers.split(",") if args.readers else list(fuzzing.READERS)
    unknown = [n for n in names if n not in fuzzing.READERS]
    if unknown:
        ap.error(f"unknown readers {unknown}; readers: {', '.join(fuzzing.READERS)}")
    save = args.save or Path(tempfile.mkdtemp(prefix="k2quant-fuzz-"))
    worker = fuzzing.Worker(fuzzing.make_bases(), timeout=args.timeout)
    worker.start()
    bad = {n: d for n, (s, d) in worker.warm.items() if s != "opened"}
    if bad:
        sys.exit(f"the valid files do not open: {bad}")
    rows = []
    try:
        for name in names:
            rows.append(fuzz_reader(worker, name, args.cases, args.seed, save))
            r = rows[-1]
            print(f"  {name}: {r['cases']} cases, {r['failed']} failed, {r['seconds']:.0f} s", file=sys.stderr)
    finally:
        worker.close()
    head = f"{'reader':<20}{'cases':>8}{'opened fine':>13}{'k2quant error':>15}{'failures':>10}{'s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['reader']:<20}{r['cases']:>8}{r['opened']:>13}{r['refused']:>15}{r['failed']:>10}{r['seconds']:>7.0f}"
        )
    total = {k: sum(r[k] for r in rows) for k in ("cases", "opened", "refused", "failed", "seconds")}
    print("-" * len(head))
    print(f"{'all':<20}{total['cases']:>8}{total['opened']:>13}{total['refused']:>15}{total['failed']:>10}"
          f"{total['seconds']:>7.0f}")  # fmt: skip
    print(f"worker started {worker.starts} time(s); address-space limit {worker.limit / 2**30:.2f} GiB; "
          f"time limit {args.timeout:.0f} s per case")  # fmt: skip
    failures = [f for r in rows for f in r["failures"]]
    if failures:
        print(f"\n{len(failures)} failing case(s), saved under {save}:")
        for f in failures[:50]:
            print(f"  {f}")
        sys.exit(1)


if __name__ == "__main__":
    main()
