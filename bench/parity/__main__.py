"""``python -m bench.parity [DIR] [-k SUBSTRING] [--record-costs]``: run every official-code fixture
through our networks and print fixture -> outputs -> max |diff| -> tolerance -> seconds -> verdict
(exit 1 on a mismatch).

DIR defaults to ``$BENCH_PARITY_DIR`` or ``../shared/parity``. ``--record-costs`` writes each checked
fixture's seconds into ``bench/parity/costs.json`` (the test suite's budget reads them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.parity import check_fixture
from bench.parity.costs import record_costs
from bench.malloc import reuse_freed_memory
from bench.parity.fixtures import Fixture, discover, parity_dir


def main(argv=None) -> int:
    with reuse_freed_memory():
        return _main(argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", help="parity folder (default: $BENCH_PARITY_DIR or ../shared/parity)")
    ap.add_argument("-k", dest="only", default="", help="only fixtures whose <method>/<case> contains this")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--record-costs", action="store_true",
                    help="write the measured seconds per fixture to bench/parity/costs.json (quiet machine!)")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else parity_dir()
    files = discover(root)
    if not files:
        print(f"no parity fixtures under {root}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, failed, seconds = [], 0, {}
    print(f"{'fixture':44s} {'outputs':>7s} {'max |diff|':>11s} {'worst ratio':>11s} {'tolerance':24s} {'s':>6s}  verdict")
    for path in files:
        fx = Fixture.load(path, root)
        if args.only and args.only not in fx.name:
            continue
        t0 = time.time()
        try:
            result = check_fixture(fx)
        except Exception as exc:  # noqa: BLE001 - reported per fixture, the others still run
            failed += 1
            print(f"{fx.name:44s} {'':>7s} {'':>11s} {'':>11s} {'':24s} {time.time() - t0:6.1f}  ERROR {type(exc).__name__}: {exc}")
            continue
        tol = fx.data.get("tolerance", {})
        tol_text = f"atol {tol.get('atol', 1e-10):g} rtol {tol.get('rtol', 1e-9):g}"
        ratio = max((c.max_abs_diff / (c.tolerance.atol or 1.0) for c in result.checks if c.max_abs_diff == c.max_abs_diff),
                    default=float("nan"))
        verdict = "ok" if result.ok else "DIFFERS: " + result.first_failure.name + ": " + result.first_failure.error
        failed += not result.ok
        seconds[fx.name] = time.time() - t0
        print(f"{fx.name:44s} {len(result.checks):7d} {result.max_abs_diff:11.3g} {ratio:11.3g} {tol_text:24s} "
              f"{seconds[fx.name]:6.1f}  {verdict}")
        rows.append(result)
    print(f"{len(rows)} fixtures checked, {failed} failed")
    if args.record_costs and seconds:
        print(f"costs recorded in {record_costs(seconds)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
