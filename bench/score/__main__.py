"""``python -m bench.score``: score folders of images with the harness' own metric code.

    python -m bench.score --fake outputs/ --real ground_truth/ --metrics fid,kid,swd,l1,psnr,ssim
    python -m bench.score --fake out_k1/ --fake out_k2/ --fake out_k3/ --metrics lpips_diversity
    python -m bench.score --fake out/ --real gt/ --exemplars ex/ --conditions labels/ \\
        --exemplar-conditions ex_labels/ --metrics all --json scores.json \\
        --tracking-uri sqlite:///mlflow.db --experiment scores

Files are paired by their path relative to each folder without the extension (``a/01.png`` and
``a/01.jpg`` pair; names are case-sensitive); every folder must hold the same names. Images must
all have the size of the first --fake image. Metric names are the harness' (``fid_sources``,
``swd``, ...); ``fid`` and ``kid`` mean ``fid_sources`` and ``kid_sources`` (--fake vs --real);
``all`` scores every metric whose inputs were given. Exit codes: 0 scored, 2 a problem with the
arguments, folders or files (one line on stderr, no traceback) or missing weights (what to do).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake", type=Path, action="append", required=True, metavar="DIR",
                   help="generated images; repeat for lpips_diversity (output k of every input in the k-th folder)")
    p.add_argument("--real", type=Path, metavar="DIR", help="the ground truth of each generated image")
    p.add_argument("--exemplars", type=Path, action="append", default=[], metavar="DIR",
                   help="the exemplar each image was made with (once, or once per --fake)")
    p.add_argument("--conditions", type=Path, metavar="DIR",
                   help="the inputs' label maps: single-channel images of class ids (sem_consistency, style_relevance)")
    p.add_argument("--exemplar-conditions", type=Path, metavar="DIR",
                   help="the exemplars' label maps (style_relevance)")
    p.add_argument("--metrics", required=True, help="comma-separated metric names, or all")
    p.add_argument("--option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric option as eval.metric_options takes it, e.g. fid.mode=legacy_pytorch")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the values, settings and provenance here")
    p.add_argument("--experiment", help="log an MLflow run to this experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --experiment (default: sqlite:///./mlflow.db)")
    p.add_argument("--run-name", help="MLflow run name (default: score <first --fake folder>)")
    p.add_argument("--weights-dir", help="directory searched first for pretrained weights files")
    p.add_argument("--allow-untrained-backbones", action="store_true",
                   help="run metrics whose weights are missing on seeded random networks (numbers labelled untrained)")
    p.add_argument("--no-download", action="store_true", help="never download missing weights")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="KID subsets, SWD draws, untrained backbones (default 0)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/bench"),
                   help="cache of real-image Inception features (default: .cache/bench, as a sweep's)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    if args.tracking_uri and not args.experiment:
        p.error("--tracking-uri needs --experiment NAME")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def parse_options(items: List[str], aliases: Dict[str, str]) -> Dict[str, Dict[str, object]]:
    from bench.score.pairing import ScoreInputError

    out: Dict[str, Dict[str, object]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        metric, dot, key = name.partition(".")
        if not sep or not dot or not metric or not key:
            raise ScoreInputError(f"--option {item!r}: expected METRIC.KEY=VALUE, e.g. fid.mode=legacy_pytorch")
        out.setdefault(aliases.get(metric, metric), {})[key] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace, command: str) -> int:
    import torch

    from bench.metrics import METRICS
    from bench.score import outputs
    from bench.score.inputs import ALIASES, Given, check_count, resolve_metrics
    from bench.score.pairing import ScoreInputError, scan_folder
    from bench.score.scoring import FolderInputs, ScoreOptions, build, prepare, score, stderr_progress
    from methods.base import BackboneSettings
    from methods.common.weights import MissingWeightsError

    try:
        given = Given(fakes=len(args.fake), real=args.real is not None, exemplars=len(args.exemplars),
                      conditions=args.conditions is not None, exemplar_conditions=args.exemplar_conditions is not None)
        names, skipped = resolve_metrics([m.strip() for m in args.metrics.split(",") if m.strip()], given,
                                         METRICS.names())
        if not names:
            raise ScoreInputError("no metric to score: " + "; ".join(f"{k} {v}" for k, v in skipped.items()))
        options = parse_options(args.option, ALIASES)
        unused = sorted(set(options) - set(names))
        if unused:
            raise ScoreInputError(f"--option for {', '.join(unused)}, which is not among the metrics scored")
        inputs = FolderInputs(
            fakes=[scan_folder("--fake" if i == 0 else f"--fake #{i + 1}", d) for i, d in enumerate(args.fake)],
            real=scan_folder("--real", args.real) if args.real else None,
            exemplars=[scan_folder("--exemplars" if i == 0 else f"--exemplars #{i + 1}", d)
                       for i, d in enumerate(args.exemplars)],
            conditions=scan_folder("--conditions", args.conditions) if args.conditions else None,
            exemplar_conditions=(scan_folder("--exemplar-conditions", args.exemplar_conditions)
                                 if args.exemplar_conditions else None))
        prep = prepare(inputs)
        check_count(names, len(prep.keys))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        opts = ScoreOptions(
            backbones=BackboneSettings(weights_dir=args.weights_dir, allow_untrained=args.allow_untrained_backbones,
                                       download=not args.no_download, seed=args.seed),
            cache_dir=args.cache_dir, device=device, batch_size=args.batch_size, seed=args.seed,
            metric_options=options)
        metrics = build(names, inputs, prep, opts)
    except ScoreInputError as exc:
        print(f"python -m bench.score: error: {exc}", file=sys.stderr)
        return 2
    except MissingWeightsError as exc:
        print(f"python -m bench.score: error: {exc}\n(bench.score: --weights-dir DIR, or --allow-untrained-backbones)",
              file=sys.stderr)
        return 2
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)

    result = score(metrics, inputs, prep, opts, progress=(lambda d, t: None) if args.quiet else stderr_progress)
    print(outputs.table(result))
    if args.json:
        outputs.write_json(args.json, result, command)
        print(f"json: {args.json}")
    if args.experiment:
        from bench.tracking import default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri(Path("."))
        run_id = outputs.log_mlflow(uri, args.experiment, result, args.run_name or f"score {args.fake[0].name}",
                                    command)
        print(f"mlflow: run {run_id} in experiment {args.experiment!r} ({uri})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run(args, "python -m bench.score " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
