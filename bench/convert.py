"""``python -m bench.convert METHOD PATH... --out FILE``: a released official checkpoint -> ours.

    python -m bench.convert cocosnet checkpoints/ade20k --out ckpt/cocosnet-ade20k.pt
    python -m bench.convert cocosnet_v2 checkpoints/deepfashionHD --out ckpt/cocosnet_v2-deepfashionHD.pt
    python -m bench.convert spade checkpoints/ade20k_pretrained/latest_net_G.pth --release ade20k_pretrained --out s.pt
    python -m bench.convert --list                      # every method's releases and the files each needs
    python -m bench.convert --all CKPT                  # every release found as CKPT/<method>/<release>/
                                                        # -> CKPT/converted/<method>-<release>.pt

PATH is the release folder as the official README lays it out (``latest_net_G.pth``,
``latest_net_Corr.pth``, ..., and ``opt.txt`` when present) or the files themselves. The options
come from ``opt.txt`` when there is one, else from the README test command of ``--release`` (needed
when a method has several releases and no ``opt.txt`` names one). Every official key is checked
(missing, unexpected, shape: one error listing them all) against our network built from the
resolved options, and the output holds our weights, the resolved options and where they came from
(file hashes, release, official commit); a sweep loads it with ``init_from``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from methods.common.convert import (CHECKPOINT_FORMAT, ConversionError, Converted, Release, build_converted,
                                    format_key_problems, load_official_file, parse_opt_txt)

WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
CONFIG_SUFFIXES = (".yaml", ".yml")


def converter(method: str):
    """``methods.<method>.convert`` (its ``RELEASES`` and ``convert``)."""
    import methods  # noqa: F401  (registers methods)
    from methods.registry import METHODS

    METHODS.get(method)  # a clear error for an unknown method
    try:
        return importlib.import_module(f"methods.{method}.convert")
    except ModuleNotFoundError:
        raise ConversionError(f"method {method!r} has no converter (methods/{method}/convert.py)") from None


def _files_of(paths: List[Path]) -> List[Path]:
    out = []
    for p in paths:
        if p.is_dir():  # releases may have sub-folders (MIDMs: pretrained/model.ckpt)
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise ConversionError(f"{p}: no such file or folder")
    return out


def pick_release(module, release: Optional[str], opt: Optional[Dict[str, Any]]) -> Release:
    releases: Dict[str, Release] = module.RELEASES
    if release:
        if release not in releases:
            raise ConversionError(f"unknown release {release!r}; {module.__name__} knows: {', '.join(releases)}")
        return releases[release]
    if opt and opt.get("name") in releases:
        return releases[opt["name"]]
    if len(releases) == 1:
        return next(iter(releases.values()))
    raise ConversionError(f"which release is this? give --release (one of: {', '.join(releases)})")


def match_files(rel: Release, files: List[Path]) -> Tuple[Dict[str, Path], List[str]]:
    """Official network -> file: by the release's file name (or path ending, ``pretrained/model.ckpt``), or
    ``<epoch>_net_<X>.pth`` for ``latest_net_<X>.pth``."""
    found: Dict[str, Path] = {}
    for net, name in rel.files.items():
        exact = [f for f in files if (f.as_posix().endswith("/" + name) if "/" in name else f.name == name)]
        suffix = name.split("_", 1)[1] if name.startswith("latest_") else None
        loose = [f for f in files if suffix and f.name.endswith("_" + suffix)]
        hits = exact or loose
        if len(hits) > 1:
            raise ConversionError(f"several files could be {net} ({', '.join(str(h) for h in hits)}): pass one")
        if hits:
            found[net] = hits[0]
    missing = [f"{net} ({name})" for net, name in rel.files.items() if net not in found and net not in rel.optional_files]
    return found, missing


def convert_release(method: str, paths: List[Path], release: Optional[str] = None,
                    opt_file: Optional[Path] = None) -> Tuple[Converted, Dict[str, Any]]:
    """Read, convert and check; returns the conversion and its ``source`` record."""
    module = converter(method)
    files = _files_of(paths)
    opt_path = opt_file or next((f for f in files if f.name == "opt.txt"), None)
    opt = parse_opt_txt(opt_path.read_text()) if opt_path else None
    rel = pick_release(module, release, opt)
    found, missing = match_files(rel, files)
    if missing:
        where = ", ".join(str(p) for p in paths)
        raise ConversionError(f"release {rel.name!r} needs {', '.join(missing)}; not found in {where}")
    options = dict(opt) if opt else dict(rel.options)
    official: Dict[str, Dict[str, torch.Tensor]] = {}
    for net, f in found.items():
        if f.suffix in CONFIG_SUFFIXES:
            options[net] = yaml.safe_load(f.read_text())
        else:
            official[net] = load_official_file(f)
    converted = module.convert(official, options)
    check_against_ours(method, converted)
    source = {"official": True, "release": rel.name, "command": rel.command,
              "official_repo": getattr(module, "OFFICIAL_REPO", ""), "official_commit": getattr(module, "OFFICIAL_COMMIT", ""),
              "options_from": str(opt_path) if opt_path else f"README test command of {rel.name}",
              "files": {net: {"path": str(f.resolve()), "sha256": _sha256(f)} for net, f in found.items()},
              "dropped": converted.dropped}
    return converted, source


def check_against_ours(method: str, converted: Converted) -> None:
    """Every converted key is one of our method's, with our shape, and each network it has is complete
    (our method built on the meta device from the resolved options: no memory, no weights)."""
    from methods.registry import METHODS

    ours = build_converted(METHODS.get(method), converted, training=True)
    exclude = tuple(ours.pretrained_exclude)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith(exclude)}
    given = converted.state_dict
    nets = {k.split(".", 1)[0] for k in given}
    missing = [k for k in shapes if k.split(".", 1)[0] in nets and k not in given]
    unexpected = [k for k in given if k not in shapes]
    bad = [f"{k}: {tuple(given[k].shape)} vs ours {shapes[k]}" for k in given if k in shapes and tuple(given[k].shape) != shapes[k]]
    if missing or unexpected or bad:
        raise ConversionError(format_key_problems(f"{method}: the converted weights do not fit our network", missing,
                                                  unexpected, bad))


def _sha256(path: Path) -> str:
    from methods.common.weights import file_sha256

    return file_sha256(path)


def write_checkpoint(out: Path, method: str, converted: Converted, source: Dict[str, Any]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".part{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, "method": method, "options": converted.options,
                "context": converted.context, "model": {k: v.detach().contiguous() for k, v in converted.state_dict.items()},
                "source": source}, tmp)
    os.replace(tmp, out)
    return out


def _plain(value: Any) -> Any:
    """YAML-safe: tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def list_releases() -> List[str]:
    import methods  # noqa: F401
    from methods.registry import METHODS

    lines = []
    for name in METHODS.names():
        try:
            module = converter(name)
        except ConversionError:
            continue
        for rel in module.RELEASES.values():
            files = ", ".join(f"{n}{' (optional)' if k in rel.optional_files else ''}" for k, n in rel.files.items())
            ds = rel.dataset + (f"-{rel.variant}" if rel.variant else "")
            lines.append(f"{name} --release {rel.name}: {files} -> evaluates on {ds}")
    return lines


def convert_all(root: Path, out_dir: Optional[Path] = None, log=print) -> List[Path]:
    """Convert every release found as ``root/<method>/<release>/`` to ``out_dir/<method>-<release>.pt``
    (default ``root/converted``); the names ``sweeps/official_checkpoints.yaml`` expects."""
    import methods  # noqa: F401
    from methods.registry import METHODS

    out_dir = Path(out_dir) if out_dir else Path(root) / "converted"
    written = []
    for name in METHODS.names():
        try:
            module = converter(name)
        except ConversionError:
            continue
        for rel in module.RELEASES:
            folder = Path(root) / name / rel
            if not folder.is_dir():
                log(f"skip {name} {rel}: no folder {folder}")
                continue
            converted, source = convert_release(name, [folder], rel)
            out = write_checkpoint(out_dir / f"{name}-{rel}.pt", name, converted, source)
            log(f"wrote {out}")
            written.append(out)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?", help="spade, cocosnet, cocosnet_v2 or midms")
    ap.add_argument("paths", nargs="*", type=Path, help="the release folder, or its files")
    ap.add_argument("--out", type=Path, help="our checkpoint to write (.pt)")
    ap.add_argument("--release", help="which release (default: from opt.txt, or the method's only one)")
    ap.add_argument("--opt", type=Path, help="an opt.txt to read the options from")
    ap.add_argument("--list", action="store_true", help="list every method's releases and exit")
    ap.add_argument("--all", type=Path, metavar="ROOT", help="convert every ROOT/<method>/<release>/ folder to "
                    "ROOT/converted/<method>-<release>.pt (or --out-dir)")
    ap.add_argument("--out-dir", type=Path, help="with --all: where the converted files go")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(list_releases()))
        return 0
    if args.all:
        try:
            written = convert_all(args.all, args.out_dir)
        except (ConversionError, FileNotFoundError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{len(written)} releases converted")
        return 0 if written else 2
    if not args.method or not args.paths or not args.out:
        ap.error("give METHOD PATH... --out FILE (or --list)")
    try:
        converted, source = convert_release(args.method, args.paths, args.release, args.opt)
    except (ConversionError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = write_checkpoint(args.out, args.method, converted, source)
    n = sum(v.numel() for v in converted.state_dict.values())
    nets = sorted({k.split(".", 1)[0] for k in converted.state_dict})
    print(f"wrote {out}: {args.method} release {source['release']}, networks {', '.join(nets)}, {n / 1e6:.1f} M "
          f"parameters, {len(converted.dropped)} official keys deliberately dropped")
    print(f"evaluate it with a sweep entry: {{name: {args.method}, init_from: {out}}} on "
          f"{converted.context.get('dataset')}{'-' + converted.context['variant'] if converted.context.get('variant') else ''} "
          f"at resolution {converted.context.get('resolution')}, method options:")
    print(yaml.safe_dump({"options": _plain(converted.options)}, sort_keys=False, default_flow_style=False).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
