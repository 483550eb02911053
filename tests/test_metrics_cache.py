"""The on-disk reference-feature cache: keys, atomic writes, computed-vs-reused logging, merging."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from bench.metrics import feature_cache as C


def test_cache_key_is_stable_order_free_and_sensitive():
    k = C.cache_key(data_key="d", split="test", resolution=64, mode="clean", backbone="sha256:ab", n=10)
    assert k == C.cache_key(n=10, backbone="sha256:ab", mode="clean", resolution=64, split="test", data_key="d")
    for change in ({"n": 11}, {"mode": "legacy_pytorch"}, {"backbone": "untrained(seed=0)"}, {"resolution": 128},
                   {"split": "val"}, {"data_key": "e"}):
        parts = dict(data_key="d", split="test", resolution=64, mode="clean", backbone="sha256:ab", n=10)
        parts.update(change)
        assert C.cache_key(**parts) != k


def test_get_or_compute_logs_computed_then_reused(tmp_path, caplog):
    cache = C.FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"mu": np.arange(3.0)}

    caplog.set_level(logging.INFO, logger="bench.metrics.feature_cache")
    a = cache.get_or_compute("refstats", "k1", {"why": "test"}, compute)
    b = cache.get_or_compute("refstats", "k1", {"why": "test"}, compute)
    assert len(calls) == 1 and np.array_equal(a["mu"], b["mu"]) and set(b) == {"mu"}
    msgs = [r.getMessage() for r in caplog.records]
    assert any("computed and saved" in m for m in msgs) and any("reused from" in m for m in msgs)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.npz"
    C.atomic_save_npz(target, {"a": np.ones(4)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        C.atomic_save_npz(target, {"a": np.zeros(4)})
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]  # no temp file left behind
    with np.load(target) as d:
        assert np.array_equal(d["a"], np.ones(4))  # the old content is intact


def test_bank_computes_once_dedupes_and_merges_concurrent_writers(tmp_path):
    cache = C.FeatureCache(tmp_path)
    imgs = np.random.RandomState(0).randint(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    feat = lambda x: x.reshape(len(x), -1)[:, :4].astype(np.float32)
    seen = []

    def compute(x):
        seen.append(len(x))
        return feat(x)

    a = C.FeatureBank(cache, "key", {})
    b = C.FeatureBank(cache, "key", {})  # a second process, opened before a wrote anything
    digests, rows = a.lookup(np.concatenate([imgs[:3], imgs[:1]]), compute)  # a duplicate inside the batch
    assert seen == [3] and np.array_equal(rows, feat(np.concatenate([imgs[:3], imgs[:1]])))
    b.lookup(imgs[3:], compute)
    a.flush()
    b.flush()  # must merge a's rows from disk, not overwrite them
    c = C.FeatureBank(cache, "key", {})
    seen.clear()
    _, rows = c.lookup(imgs, compute)
    assert seen == [] and np.array_equal(rows, feat(imgs)) and len(c.rows) == 5


def test_lru_memo_bounded():
    memo = C.LRUFeatureMemo(capacity=3)
    imgs = np.arange(5 * 12, dtype=np.uint8).reshape(5, 2, 2, 3)
    count = []
    f = lambda x: (count.append(len(x)), x.reshape(len(x), -1).astype(np.float32))[1]
    memo.lookup(imgs[:3], f)
    memo.lookup(imgs[:3], f)
    assert count == [3]
    memo.lookup(imgs[3:], f)
    assert len(memo.rows) == 3
    out = memo.lookup(imgs[:1], f)  # evicted -> recomputed, still correct
    assert count == [3, 2, 1] and np.array_equal(out, imgs[:1].reshape(1, -1).astype(np.float32))


def test_image_digest_includes_shape():
    a = np.zeros((2, 8, 3), np.uint8)
    assert C.image_digest(a) != C.image_digest(a.reshape(8, 2, 3))
    assert C.image_digest(a) == C.image_digest(a.copy())
