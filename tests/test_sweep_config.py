"""Sweep files: strict validation with useful messages, overrides, profiles, grid expansion, identity."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.config import ConfigError
from bench.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
seeds: [0, 1, 2]
methods:
  - name: spade
    options: {ngf: 16}
    variants:
      full: {}
      no_vgg: {lambda_vgg: 0}
      short: {train.steps: 7}
datasets:
  - name: embedded
    variant: edge
  - embedded
train:
  steps: 3
scale:
  resolution: 64
  width: 0.125
profiles:
  smoke:
    train.steps: 1
    datasets: [{name: embedded, variant: keypoint}]
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def error_of(path: str, overrides=(), profile=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_sweep(path, list(overrides), profile)
    return str(exc.value)


def test_grid_expansion_order_and_names(tmp_path):
    trials = expand(load_sweep(write(tmp_path, GOOD)))
    assert len(trials) == 3 * 2 * 3  # variants x datasets x seeds
    assert trials[0].name == "spade/full/embedded-edge/s0"
    assert trials[3].name == "spade/full/embedded-mask/s0"  # default variant filled in
    assert [t.seed for t in trials[:3]] == [0, 1, 2]
    by_variant = {t.variant: t for t in trials}
    assert by_variant["no_vgg"].method_options["lambda_vgg"] == 0
    assert by_variant["full"].method_options["lambda_vgg"] == 10.0  # default resolved
    assert by_variant["full"].method_options["ngf"] == 16  # shared options apply to every variant
    assert by_variant["short"].train.steps == 7 and by_variant["full"].train.steps == 3


def test_identity_is_stable_and_ignores_observation_settings(tmp_path):
    path = write(tmp_path, GOOD)
    a = expand(load_sweep(path))[0]
    assert a.key == expand(load_sweep(path))[0].key
    assert a.key == expand(load_sweep(path, ["train.log_every=1", "resources.cpu=2"]))[0].key
    assert a.key != expand(load_sweep(path, ["train.steps=4"]))[0].key
    assert len({t.key for t in expand(load_sweep(path))}) == 18


def test_overrides_and_profiles(tmp_path):
    path = write(tmp_path, GOOD)
    t = expand(load_sweep(path, ["train.batch_size=2", "eval.metrics=[l1, psnr]", "resources.gpu=0.5"]))[0]
    assert (t.train.batch_size, t.eval.metrics, t.resources.gpu) == (2, ["l1", "psnr"], 0.5)
    smoke = expand(load_sweep(path, profile="smoke"))
    assert {t.dataset.variant for t in smoke} == {"keypoint"} and smoke[0].train.steps == 1
    assert "profile 'nope' is not defined; profiles: smoke" in error_of(path, profile="nope")


def test_unknown_key_names_file_path_line_and_nearest(tmp_path):
    path = write(tmp_path, GOOD.replace("  steps: 3", "  stpes: 3"))
    msg = error_of(path)
    assert msg.startswith(f"{path}:15: train.stpes: unknown key; did you mean 'steps'?")


def test_unknown_top_level_and_nested_keys(tmp_path):
    msg = error_of(write(tmp_path, GOOD + "resource: {cpu: 1}\n"))
    assert "resource: unknown key; did you mean 'resources'?" in msg
    msg = error_of(write(tmp_path, GOOD.replace("variant: edge", "variant: edge\n    optoins: {}")))
    assert "datasets.0.optoins: unknown key; did you mean 'options'?" in msg


def test_unknown_method_option_in_variant(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("lambda_vgg: 0", "lambda_vggg: 0")))
    assert "methods.0.variants.no_vgg" in msg and "did you mean 'lambda_vgg'?" in msg


def test_unknown_names_list_the_known_ones(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("name: spade", "name: spaed")))
    assert "methods.0.name: unknown method 'spaed'. Did you mean 'spade'?" in msg and "Known methods:" in msg
    msg = error_of(write(tmp_path, GOOD), ["eval.metrics=[l1, fidd]"])
    assert "eval.metrics.1: unknown metric 'fidd'" in msg
    msg = error_of(write(tmp_path, GOOD.replace("variant: edge", "variant: edges")))
    assert "unknown variant 'edges'" in msg and "'mask', 'edge', 'keypoint'" in msg


def test_type_errors_and_bad_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    assert "train.steps: expected int, got str 'many'" in error_of(path, ["train.steps=many"])
    assert "expected key=value" in error_of(path, ["train.steps"])
    assert "seeds: expected a list" in error_of(path, ["seeds=3"])
    msg = error_of(write(tmp_path, GOOD.replace("variants:", "variants:\n      bad: {foo.bar: 1}")))
    assert "dotted keys must start with one of" in msg


def test_invalid_yaml_and_missing_file(tmp_path):
    msg = error_of(write(tmp_path, "name: x\nmethods: [\n"))
    assert "not valid YAML" in msg and "sweep.yaml:" in msg
    assert "sweep file not found" in error_of(str(tmp_path / "absent.yaml"))
    assert "methods: required key is missing" in error_of(write(tmp_path, "name: x\ndatasets: [embedded]\n"))


def test_yaml_is_loaded_safely(tmp_path):
    msg = error_of(write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n"))
    assert "not valid YAML" in msg


def run_cli(*args, cwd=REPO, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_dry_run_and_list(tmp_path):
    out = run_cli(write(tmp_path, GOOD), "--dry-run", "train.steps=5", "train.allow_untrained_backbones=true")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[18] == "18 trials"  # the trial table, then the preflight's verdict
    assert lines[0].startswith("spade/full/embedded-edge/s0  key=") and "steps=5" in lines[0]
    assert lines[-1] == "preflight: every trial can start"
    assert "spade/no_vgg on embedded-edge: 3 trials" in out.stdout
    # Without the opt-in and without the VGG19 file, the verdict names the file and the trials that need it.
    strict = run_cli(write(tmp_path, GOOD), "--dry-run", env_extra={"TORCH_HOME": str(tmp_path / "no_weights"),
                                                                     "BENCH_OFFLINE": "1"})
    assert strict.returncode == 2, strict.stdout
    assert "18 trials" in strict.stdout and "vgg19-dcbb9e9d.pth" in strict.stdout
    assert "spade/full, spade/short on embedded-edge" in strict.stdout  # no_vgg needs no VGG
    assert "train.allow_untrained_backbones=true" in strict.stdout
    listed = run_cli("--list").stdout.splitlines()
    assert "method spade" in listed and "dataset embedded" in listed and "metric ssim" in listed
    assert "recipe cocosnet:celebahq-edge" in listed
    assert all(line.split(" ")[0] in ("method", "dataset", "metric", "recipe") and len(line.split(" ")) == 2
               for line in listed)
    bad = run_cli(write(tmp_path, GOOD), "--dry-run", "train.stepz=5")
    assert bad.returncode == 2 and "train.stepz: unknown key; did you mean 'steps'?" in bad.stderr


def test_shipped_sweeps_validate():
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        spec = load_sweep(str(path))
        assert expand(spec), path
        text = path.read_text()
        if "profiles:" in text and "smoke:" in text:
            assert expand(load_sweep(str(path), profile="smoke"))


def test_readme_sweep_example_is_valid():
    import re

    import yaml

    from bench.sweep import spec_from_dict

    text = (REPO / "README.md").read_text()
    block = re.search(r"### A sweep file.*?```yaml\n(.*?)```", text, re.S).group(1)
    spec = spec_from_dict(yaml.safe_load(block), "README.md")
    assert len(expand(spec)) == 3 * 2 * 3
    assert len(expand(spec_from_dict(yaml.safe_load(block), "README.md", profile="smoke"))) == 3 * 1 * 3


RECIPES = """\
name: r
methods:
  - name: spade
    options: {ngf: 16}
    recipes:
      embedded-edge: {lambda_feat: 4.0}
    variants:
      full: {}
      no_vgg: {lambda_vgg: 0}
datasets:
  - {name: embedded, variant: edge}
  - {name: embedded, variant: mask}
train: {steps: 3}
"""


@pytest.fixture
def official_spade_recipes(monkeypatch):
    from methods.registry import METHODS

    monkeypatch.setattr(METHODS.get("spade"), "recipes", {
        "embedded": {"lambda_vgg": 1.0, "lambda_feat": 2.0, "ngf": 99, "train.steps": 5},
        "embedded-edge": {"lambda_feat": 3.0},
    }, raising=False)


def test_recipes_apply_per_dataset_in_order(tmp_path, official_spade_recipes):
    """method defaults < official recipe (name, then name-variant) < options < sweep recipes < variant."""
    trials = {t.name: t for t in expand(load_sweep(write(tmp_path, RECIPES)))}
    edge, mask = trials["spade/full/embedded-edge/s0"], trials["spade/full/embedded-mask/s0"]
    assert (edge.method_options["lambda_vgg"], edge.method_options["lambda_feat"]) == (1.0, 4.0)
    assert (mask.method_options["lambda_vgg"], mask.method_options["lambda_feat"]) == (1.0, 2.0)
    assert edge.method_options["ngf"] == mask.method_options["ngf"] == 16  # sweep options beat the recipe
    assert edge.train.steps == mask.train.steps == 5  # dotted recipe keys set trial sections
    assert edge.recipe == "official:embedded+official:embedded-edge+sweep:embedded-edge"
    assert mask.recipe == "official:embedded"
    assert trials["spade/no_vgg/embedded-edge/s0"].method_options["lambda_vgg"] == 0  # the variant wins
    none = expand(load_sweep(write(tmp_path, RECIPES.replace("  - name: spade\n", "  - name: spade\n    recipe: none\n"))))
    plain = {t.name: t for t in none}["spade/full/embedded-mask/s0"]
    assert (plain.method_options["lambda_vgg"], plain.method_options["lambda_feat"], plain.recipe) == (10.0, 10.0, "")
    assert plain.key != mask.key  # different options, different trial


def test_recipe_errors(tmp_path, official_spade_recipes):
    msg = error_of(write(tmp_path, RECIPES.replace("embedded-edge: {lambda_feat", "embedded-egde: {lambda_feat")))
    assert "recipes.embedded-egde: not a dataset or dataset-variant" in msg and "'embedded-edge'" in msg
    assert ":6:" in msg  # the line of the key
    # a recipe for a dataset the sweep (or its profile) does not use is fine: it applies to nothing
    trials = expand(load_sweep(write(tmp_path, RECIPES.replace("embedded-edge: {lambda_feat", "ade20k: {lambda_feat"))))
    assert {t.method_options["lambda_feat"] for t in trials} == {2.0, 3.0}
    msg = error_of(write(tmp_path, RECIPES.replace("  - name: spade\n", "  - name: spade\n    recipe: paper\n")))
    assert "recipe: must be 'official' or 'none'" in msg
    msg = error_of(write(tmp_path, RECIPES.replace("{lambda_feat: 4.0}", "{lambda_fet: 4.0}")))
    assert "lambda_fet" in msg and "lambda_feat" in msg
