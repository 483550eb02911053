"""Build exemplar (ref) lists by VGG-feature retrieval, as CoCosNet did for its lists.

    python -m datasets.build_refs DATASET --root PATH --out FILE [--top-k 20]
        [--split test] [--pool-split train] [--variant V] [--option key=value ...]
        [--resolution 224] [--weights-dir DIR] [--allow-untrained-backbones]

CoCosNet issue #10: features of an ImageNet VGG after the last max-pool (before the classifier),
cosine similarity, top-K. Each output line is ``key,best,...,k-th`` - the ``key,easy,...,hard``
order the loaders read (eval uses the first; train picks the first or, with
``hard_reference_probability``, the last). A query is never its own exemplar.

The file starts with ``#`` comment lines that record the dataset, splits and backbone weights.
Without the VGG19 weights the command stops (``MissingWeightsError``) unless
``--allow-untrained-backbones`` is given; then a seeded random-init VGG19 is used and the header
says UNTRAINED: such lists exercise the pipeline but are not retrieval results.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets.build_refs", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True, help="output list file (e.g. data/ade20k_ref_test.txt)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--split", default="test", help="split of the query images (train, val, test)")
    p.add_argument("--pool-split", default="train", help="split the exemplars are drawn from")
    p.add_argument("--variant", default=None)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resolution", type=int, default=224, help="image side fed to VGG (224 = ImageNet)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--weights-dir", default=None, help="folder with vgg19-dcbb9e9d.pth")
    p.add_argument("--no-download", action="store_true", help="do not try to download the VGG19 weights")
    p.add_argument("--allow-untrained-backbones", action="store_true",
                   help="use a seeded random-init VGG19 when the weights are missing (labelled UNTRAINED)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init backbone")
    return p


def load_split(name: str, root: str, variant: Optional[str], split: str, resolution: int, options: dict,
               max_samples: Optional[int]):
    """The dataset split (exemplar policy irrelevant here: only its photos are read)."""
    from datasets.base import DatasetSpec
    from datasets.registry import DATASETS

    opts = dict(options, train_exemplars="random", eval_exemplars="random")
    spec = DatasetSpec(name=name, variant=variant, root=root, max_samples=max_samples, options=opts)
    return DATASETS.get(name)(spec, split, resolution)


@torch.no_grad()
def pool5_features(ds, backbone: torch.nn.Module, batch_size: int) -> Tuple[List[str], torch.Tensor]:
    """Keys and L2-normalised VGG19 pool5 features (flattened) of every photo of ``ds``."""
    from methods.common.vgg import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    keys, feats = [], []
    for start in range(0, len(ds.records), batch_size):
        recs = ds.records[start:start + batch_size]
        x = torch.from_numpy(np.stack([ds.photo(r).transpose(2, 0, 1) for r in recs])).float()
        f = backbone((x - mean) / std).flatten(1)
        feats.append(torch.nn.functional.normalize(f, dim=1))
        keys += [r.key for r in recs]
    return keys, torch.cat(feats)


def rank(query: torch.Tensor, pool: torch.Tensor, query_keys: Sequence[str], pool_keys: Sequence[str],
         top_k: int) -> List[List[int]]:
    """Indices into the pool, most similar first, excluding the query itself."""
    sim = query @ pool.T
    index = {k: j for j, k in enumerate(pool_keys)}
    for i, k in enumerate(query_keys):
        if k in index:
            sim[i, index[k]] = -float("inf")
    k = min(top_k, len(pool_keys) - (1 if set(query_keys) & set(pool_keys) else 0))
    return sim.topk(k, dim=1).indices.tolist()


def write_list(path: Path, header: List[str], lines: List[str]) -> None:
    """Atomic write: header comments then one line per query."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"# {h}\n" for h in header) + "".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import datasets  # noqa: F401
    from datasets._io import DatasetError
    from datasets.prepare import parse_options
    from methods.base import BackboneSettings
    from methods.common.vgg import load_vgg19_features
    from methods.common.weights import MissingWeightsError, is_untrained

    if args.top_k < 1:
        print("error: --top-k must be >= 1", file=sys.stderr)
        return 2
    options = parse_options(args.option)
    try:
        settings = BackboneSettings(weights_dir=args.weights_dir, allow_untrained=args.allow_untrained_backbones,
                                    download=not args.no_download, seed=args.seed)
        features, provenance = load_vgg19_features(settings, "datasets.build_refs (VGG19 retrieval)")
        query_ds = load_split(args.dataset, args.root, args.variant, args.split, args.resolution, options,
                              args.max_samples)
        pool_ds = load_split(args.dataset, args.root, args.variant, args.pool_split, args.resolution, options, None)
    except (MissingWeightsError, DatasetError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    qk, qf = pool5_features(query_ds, features, args.batch_size)
    pk, pf = pool5_features(pool_ds, features, args.batch_size)
    if len(pk) < 2 and set(qk) & set(pk):
        print("error: the exemplar pool has no image other than the query", file=sys.stderr)
        return 2
    ranked = rank(qf, pf, qk, pk, args.top_k)
    header = [f"exbench datasets.build_refs: dataset={args.dataset} variant={query_ds.variant} root={query_ds.root}",
              f"queries: split {args.split} ({len(qk)}), exemplars: split {args.pool_split} ({len(pk)}), "
              f"top_k={len(ranked[0]) if ranked else 0}, resolution={args.resolution}",
              f"retrieval: VGG19 features after the last max-pool, cosine similarity; weights {provenance}"]
    if is_untrained(provenance):
        header.append("UNTRAINED backbone (random init, --allow-untrained-backbones): these are NOT retrieval "
                      "results, only a pipeline check")
    lines = [",".join([q] + [pk[j] for j in row]) for q, row in zip(qk, ranked)]
    write_list(Path(args.out), header, lines)
    print(f"wrote {len(lines)} lines to {args.out} (weights {provenance})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
