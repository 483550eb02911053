"""Shared fixtures: the repository root, the real-data fixtures, a Ray instance for the whole
session (shut down at the end), and the toy plugin method."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENCH_PLUGINS", "tests.plugins.toy_methods")
os.environ.setdefault("BENCH_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def fixtures_root() -> Path:
    return Path(os.environ.get("BENCH_FIXTURES", REPO.parent / "shared" / "fixtures" / "real"))


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    root = fixtures_root()
    if not root.is_dir():
        pytest.skip(f"real dataset fixtures not found at {root} (set BENCH_FIXTURES)")
    return root


@pytest.fixture()
def offline_weights(monkeypatch, tmp_path):
    """No weights anywhere and no network: every pretrained network must be found or opted out of."""
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("BENCH_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every in-process sweep test (saves ~5 s of start-up per sweep)."""
    import ray

    from bench.plugins import load_plugins
    from bench.runner import worker_env

    load_plugins()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env([str(REPO)])},
             logging_level="WARNING", log_to_driver=True)
    yield ray
    ray.shutdown()
