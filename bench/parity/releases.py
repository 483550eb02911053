"""Official-format release folders made from the parity manifests with ``fill.py``: what a released
checkpoint looks like on disk (``latest_net_G.pth``, ... and the LDM ``config.yaml`` for MIDMs),
with deterministic weights instead of trained ones. They let the whole path -- ``bench.convert``,
``init_from``, an evaluation-only sweep (``sweeps/official_checkpoints.yaml --profile smoke``) --
run where the real releases cannot be downloaded, e.g. in CI.

    python -m bench.parity.releases OUT_DIR [--seed N]     # OUT_DIR/<method>/<release>/...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from bench.parity.fixtures import load_fill, parity_dir


def manifest_for(method: str, release: str, root: Optional[Path] = None) -> dict:
    """The paper-scale manifest file of ``method``'s ``release`` (its ``release`` field)."""
    folder = Path(root or parity_dir()) / method / "manifests"
    for f in sorted(folder.glob("*.json")):
        m = json.loads(f.read_text())
        if m.get("release") == release:
            return m
    raise FileNotFoundError(f"no manifest for {method} release {release!r} in {folder}")


def _config(manifest: dict, networks: List[str]) -> dict:
    """The manifest configuration that has every network the release files need (test first)."""
    configs = manifest["configs"]
    ordered = sorted(configs, key=lambda name: ("test" not in name, name))
    for name in ordered:
        if set(networks) <= set(configs[name].get("networks", {})):
            return configs[name]
    raise KeyError(f"no configuration of release {manifest.get('release')!r} has networks {networks}")


REDUNDANT_KINDS = ("duplicate", "EMA", "buffer")  # manifest "kind"s the converters drop: copies, EMA, schedules


def write_release(method: str, release: str, out_dir: Path, seed: int = 0, root: Optional[Path] = None,
                  lean: bool = True) -> Path:
    """Write ``out_dir/<method>/<release>/`` with every file of the release, filled with ``seed``.
    ``lean`` leaves out the entries a manifest marks (``kind``) as duplicates, EMA shadows or computed
    buffers -- what the converter drops anyway; MIDMs' full file would be 4 GB instead of 1.4."""
    from bench.convert import converter

    rel = converter(method).RELEASES[release]
    manifest = manifest_for(method, release, root)
    fill = load_fill(Path(root or parity_dir()))
    folder = Path(out_dir) / method / release
    folder.mkdir(parents=True, exist_ok=True)
    weight_nets = [net for net, name in rel.files.items() if not name.endswith((".yaml", ".yml"))]
    config = _config(manifest, [n for n in weight_nets if n not in rel.optional_files])
    for net, name in rel.files.items():
        if name.endswith((".yaml", ".yml")):
            (folder / name).write_text(yaml.safe_dump({"model": manifest["ldm_config"]}, sort_keys=False))
            continue
        if net not in config["networks"]:
            continue  # an optional network this configuration does not have
        keys = config["networks"][net]
        kinds = config.get("kind", {})
        if lean and kinds:
            keys = {k: v for k, v in keys.items() if not any(r in kinds.get(k, "") for r in REDUNDANT_KINDS)}
        state: Dict[str, torch.Tensor] = fill.fill_state_dict(keys, seed)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / name)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parity.releases", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", action="append", help="only these methods (repeatable)")
    args = ap.parse_args(argv)
    import methods  # noqa: F401
    from bench.convert import converter
    from methods.registry import METHODS

    for method in METHODS.names():
        if args.method and method not in args.method:
            continue
        try:
            releases = converter(method).RELEASES
        except Exception:  # noqa: BLE001 - methods without a converter have no releases
            continue
        for release in releases:
            print(write_release(method, release, args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
