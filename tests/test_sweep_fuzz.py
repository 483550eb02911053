"""No sweep file, override or baseline ends in a traceback or a hang (Hypothesis).

Valid sweeps are mutated at three levels -- raw bytes (flips, insertions, cuts, non-UTF-8), YAML
structure (keys deleted, added, values replaced by values of other types, deep nesting) and
``key=value`` overrides -- and ``bench.run --dry-run`` must either accept the result (printing the
trial table and the preflight's verdict, exit 0 or 2) or refuse it with a one-line ``error:``
message (exit 2), within seconds. The same holds for ``bench.check`` baselines and the published
tables file.
"""
from __future__ import annotations

import copy
import io
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import run as bench_run

REPO = Path(__file__).resolve().parents[1]
TOY = """\
name: fuzz
seeds: [0]
methods:
  - name: toy
    options: {step_seconds: 0}
    variants: {a: {}, b: {train.steps: 2}}
datasets:
  - {name: embedded, variant: edge, max_samples: 8}
train: {steps: 1, batch_size: 2}
eval: {num_samples: 2, batch_size: 2, metrics: [l1, ssim]}
scale: {resolution: 32, width: 0.125}
resources: {cpu: 1}
profiles:
  smoke: {train.steps: 1}
"""
BASES = [TOY.encode(), (REPO / "sweeps" / "quickstart.yaml").read_bytes()]
PER_CASE_S = 20  # generous on a loaded 2-core machine; a hang would take far longer

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def run_cli(args, tmp: Path):
    """bench.run in-process: (exit code, stdout, stderr); any exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with redirect_stdout(out), redirect_stderr(err):
        code = bench_run.main([*args, "--workdir", str(tmp)])
    assert time.time() - t0 < PER_CASE_S, f"took {time.time() - t0:.0f}s: {args}"
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, out: str, err: str) -> None:
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 2 and "preflight:" not in out + err:
        lines = err.strip().splitlines()
        assert lines and lines[0].startswith("error: "), err


def paths_of(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths_of(v, prefix + (i,))


@st.composite
def byte_mutations(draw):
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6) | st.sampled_from(
                [b"[", b"{", b"&a", b"*a", b"\t", b": ", b"- ", b"\xff\xfe", b"!!python/object:os.system", b"\x00"]))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 40))]
        else:
            del data[at:]
    return bytes(data)


@st.composite
def structure_mutations(draw):
    raw = copy.deepcopy(yaml.safe_load(draw(st.sampled_from(BASES))))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths_of(raw))))
        if not path:
            continue
        parent = raw
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(values)
        elif op == "nest":
            deep = draw(values)
            for _ in range(draw(st.integers(1, 200))):
                deep = [deep]
            parent[path[-1]] = deep
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True).encode()


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(data=st.one_of(byte_mutations(), structure_mutations()), profile=st.booleans())
def test_mutated_sweeps_give_a_clean_error_or_a_clean_dry_run(tmp_path_factory, data, profile):
    tmp = tmp_path_factory.mktemp("fuzz")
    sweep = tmp / "sweep.yaml"
    sweep.write_bytes(data)
    args = [str(sweep), "--dry-run"] + (["--profile", "smoke"] if profile else [])
    assert_clean(*run_cli(args, tmp))
    assert not (tmp / "mlflow.db").exists()  # a dry run writes nothing to MLflow


override_keys = st.sampled_from(["train.steps", "scale.resolution", "eval.metrics", "resources.gpu", "seeds",
                                 "methods", "datasets", "train", "nope.key", "", "train..steps", "scale.width"])


@FUZZ
@given(key=override_keys, value=st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                                          st.text(max_size=30)))
def test_mutated_overrides_give_a_clean_error_or_a_clean_dry_run(tmp_path_factory, key, value):
    tmp = tmp_path_factory.mktemp("fuzz")
    sweep = tmp / "sweep.yaml"
    sweep.write_text(TOY)
    assert_clean(*run_cli([str(sweep), "--dry-run", f"{key}={value}"], tmp))


@pytest.mark.parametrize("text", [
    "name: x\n" + "a: " + "[" * 5000 + "]" * 5000,  # RecursionError in PyYAML's composer
    "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n"
                                             for p, c in zip("abcdefgh", "bcdefghi")),  # alias bomb
])
def test_pathological_yaml_is_refused_in_seconds(tmp_path, text):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    code, out, err = run_cli([str(sweep), "--dry-run"], tmp_path)
    assert code == 2 and err.startswith(f"error: {sweep}") and len(err.strip().splitlines()) == 1, err


@FUZZ
@given(data=st.one_of(
    byte_mutations().map(lambda b: b.replace(b"name:", b"entries:", 1)),
    st.builds(lambda v: yaml.safe_dump({"entries": v}).encode(), values),
    st.builds(lambda v: yaml.safe_dump({"entries": [{"method": "toy", "variant": "a", "dataset": "embedded-edge",
                                                     "metrics": v}]}).encode(), values)))
def test_mutated_baselines_give_a_clean_error(tmp_path_factory, data):
    from bench.check import BaselineError, load_baseline

    _loads_or_names_the_file(tmp_path_factory, data, load_baseline, BaselineError)


@FUZZ
@given(data=st.one_of(byte_mutations(), st.builds(lambda v: yaml.safe_dump({"tables": v, "papers": v}).encode(),
                                                  values)))
def test_mutated_published_tables_give_a_clean_error(tmp_path_factory, data):
    from bench.report.data import PublishedError, load_published

    _loads_or_names_the_file(tmp_path_factory, data, load_published, PublishedError)


def _loads_or_names_the_file(tmp_path_factory, data: bytes, load, error) -> None:
    """``load`` either accepts the file or raises ``error`` with one line naming it; nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "input.yaml"
    path.write_bytes(data)
    try:
        load(path)
    except error as exc:
        assert str(path) in str(exc) and "\n" not in str(exc).strip()
