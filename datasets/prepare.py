"""Precompute a dataset's condition maps into the preprocessing cache, with a progress bar.

    python -m datasets.prepare DATASET --root PATH [--variant V] [--splits train test]
        [--resolution 256] [--option key=value ...] [--skip-bad] [--max-samples N]

Every file is decoded and checked (``validate: full``), every condition map the runs will need
at that resolution is computed once and stored under its content hash, so trials that follow
(any seed, any method) read them instead of recomputing. Bad samples stop the run with a
message naming the file, or are listed at the end with ``--skip-bad``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

import yaml


def parse_options(pairs: List[str]) -> Dict[str, Any]:
    """``key=value`` pairs; values are YAML scalars (``1``, ``0.5``, ``true``, ``null``, text)."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="registered dataset name (deepfashion, metfaces, celebahq, ade20k, lsun_church)")
    p.add_argument("--root", required=True, help="dataset root folder (see docs/datasets.md)")
    p.add_argument("--variant", default=None, help="conditioning variant (default: the dataset's first)")
    p.add_argument("--splits", nargs="+", default=["train", "test"], help="splits to prepare (train, val, test)")
    p.add_argument("--resolution", type=int, default=256, help="resolution the runs will use (default 256)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="dataset option (repeatable)")
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad samples instead of stopping")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N samples of each split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    return p


def prepare_split(name: str, spec, split: str, resolution: int, progress: bool) -> Dict[str, Any]:
    """Build one split with full validation and compute every sample's conditions."""
    from tqdm import tqdm

    from datasets.registry import DATASETS

    ds = DATASETS.get(name)(spec, split, resolution)
    for i in tqdm(range(len(ds)), desc=f"{name}/{split}", unit="sample", disable=not progress, file=sys.stderr):
        ds.prepare_sample(i)
    return {"split": split, "size": len(ds), "listed": ds.info.params.get("listed"), "skipped": list(ds.skipped),
            "cache_hits": ds.cache.hits, "cache_misses": ds.cache.misses, "cache_dir": str(ds.cache.directory)}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import datasets  # noqa: F401  (registers the datasets)
    from datasets._io import DatasetError
    from datasets.base import DatasetSpec

    options = parse_options(args.option)
    options["validate"] = "full"
    spec = DatasetSpec(name=args.dataset, variant=args.variant, root=args.root, max_samples=args.max_samples,
                       skip_bad=args.skip_bad, options=options)
    try:
        for split in args.splits:
            report = prepare_split(args.dataset, spec, split, args.resolution, not args.no_progress)
            computed, reused = report["cache_misses"], report["cache_hits"]
            cache = (f"cache {computed} computed, {reused} reused in {report['cache_dir']}" if computed + reused
                     else "all files checked; its conditions are label maps read directly, nothing to cache")
            print(f"{args.dataset}/{split}: {report['size']} samples ready ({report['listed']} listed, "
                  f"{len(report['skipped'])} skipped); {cache}")
            for file, reason in report["skipped"]:
                print(f"  skipped {file}: {reason}")
    except (DatasetError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
