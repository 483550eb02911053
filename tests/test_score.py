"""``python -m bench.score``: folders of PNGs give the numbers the harness computes in memory.

The in-memory side is ``bench.evaluate.evaluate`` itself, driving the same metric classes with a
method that replays float outputs; the folder side gets those outputs as the harness would save
them (uint8 PNGs). Plus: the pairing rule and its errors, missing inputs, sizes, --json, MLflow,
and lpips_diversity from K folders against the lpips network called directly. Small images
(64x64), seeded random backbones, offline.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.evaluate import build_metrics, evaluate
from bench.metrics import lpips_metric as L
from bench.metrics.base import MetricContext, to_uint8_hwc
from bench.score.__main__ import main
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput

pytestmark = pytest.mark.usefixtures("offline_weights")
REPO = Path(__file__).resolve().parents[1]
SIZE, N = 64, 6


def smooth(n: int, seed: int) -> torch.Tensor:
    """Float images in [-1, 1] with structure (SSIM/SWD see more than noise), not uint8-exact."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    up = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return (up + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(-1, 1)


def save_pngs(x: torch.Tensor, folder: Path, names=None, ext=".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_uint8_hwc(x)):  # the harness' quantisation of an output
        name = names[i] if names else f"{i:03d}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{name}{ext}")


def run_score(capsys, *args) -> tuple:
    code = main([str(a) for a in args] + ["--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


class Replay(torch.nn.Module):
    """A 'method' whose outputs are given tensors, by sample index."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs = outputs

    def generate(self, batch):
        return MethodOutput(output=self.outputs[batch["index"]])


def in_memory(names, fake: torch.Tensor, real_u8: torch.Tensor, batch_size: int, tmp_path: Path):
    info = DataInfo(name="t", variant="default", split="test", size=N, resolution=SIZE, cond_channels=1)
    ctx = MetricContext(data=info, device=torch.device("cpu"), cache_dir=tmp_path / "mem_cache", data_key="t",
                        backbones=BackboneSettings(allow_untrained=True, download=False), seed=0)
    metrics = build_metrics(names, ctx)
    samples = [{"cond": torch.zeros(1, SIZE, SIZE), "image": real_u8[i], "index": torch.tensor(i)} for i in range(N)]
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False)
    values, _ = evaluate(Replay(fake), loader, metrics, torch.device("cpu"))
    return values


def test_folders_give_the_harness_in_memory_numbers(tmp_path, capsys):
    fake = smooth(N, 1)
    real = smooth(N, 2)
    save_pngs(fake, tmp_path / "fake")
    save_pngs(real, tmp_path / "real")
    # the real images as the harness holds a dataset's photos: uint8-exact tensors
    real_u8 = torch.from_numpy(to_uint8_hwc(real)).permute(0, 3, 1, 2).float() / 127.5 - 1
    names = ["swd", "l1", "psnr", "ssim"]
    expect = in_memory(names, fake, real_u8, batch_size=4, tmp_path=tmp_path)
    code, out, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "real", "--metrics",
                               ",".join(names), "--batch-size", 4, "--json", tmp_path / "s.json",
                               "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    got = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert set(got) == {"swd", "swd_l64", "swd_l32", "swd_l16", "l1", "psnr", "ssim"}
    for key, value in got.items():
        assert value == pytest.approx(expect[key], rel=1e-9, abs=1e-12), key
    assert got["l1"] > 0 and np.isfinite(got["psnr"])
    for key in got:  # the table
        assert any(line.split()[:1] == [key] for line in out.splitlines())


def test_pairing_by_relative_path_without_extension(tmp_path, capsys):
    x = smooth(4, 3)
    save_pngs(x, tmp_path / "fake", names=["a/01", "a/02", "b/01", "c"])
    save_pngs(x[:3], tmp_path / "real", names=["a/01", "a/02", "b/01"])
    Image.fromarray(to_uint8_hwc(x)[3]).save(tmp_path / "real" / "c.JPG", quality=100)  # any extension case
    (tmp_path / "real" / "notes.txt").write_text("ignored")
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "real", "--metrics", "l1",
                             "--json", tmp_path / "s.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    s = doc["settings"]
    assert s["n_images"] == 4 and s["inputs.real.ignored_files"] == 1
    assert s["inputs.real.formats"] == "JPEG:1,PNG:3" and s["inputs.fake.formats"] == "PNG:4"
    assert 0 < doc["metrics"]["l1"] < 3  # identical but for one JPEG: small, not zero


def test_unpaired_files_are_an_error_listing_them(tmp_path, capsys):
    x = smooth(N, 4)
    save_pngs(x, tmp_path / "fake", names=[f"img{i}" for i in range(N)])
    save_pngs(x[:2], tmp_path / "real", names=["img0", "img1"])
    save_pngs(x[:1], tmp_path / "real", names=["other"])
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "real", "--metrics", "l1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "4 of the 6 files of --fake have no file of the same name in --real (img2, img3, img4, img5)" in err
    assert "1 of the 3 files of --real have no file of the same name in --fake (other)" in err


def test_duplicate_key_and_empty_folder(tmp_path, capsys):
    x = smooth(2, 5)
    save_pngs(x, tmp_path / "fake")
    save_pngs(x, tmp_path / "real")
    save_pngs(x[:1], tmp_path / "real", ext=".jpg")  # 000.png and 000.jpg
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "real", "--metrics", "l1")
    assert code == 2 and "two files have the key '000'" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_score(capsys, "--fake", tmp_path / "empty", "--real", tmp_path / "real", "--metrics", "l1")
    assert code == 2 and "--fake" in err and "no image files" in err


def test_sizes_must_match_the_fakes(tmp_path, capsys):
    save_pngs(smooth(3, 6), tmp_path / "fake")
    small = torch.nn.functional.interpolate(smooth(3, 7), size=(32, 32), mode="bilinear", align_corners=False)
    save_pngs(small, tmp_path / "real")
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "real", "--metrics", "ssim")
    assert code == 2 and "3 of 3 files are not 64x64" in err and "000.png 32x32" in err


def test_missing_inputs_are_named_before_any_computation(tmp_path, capsys, monkeypatch):
    import bench.score.scoring as scoring

    monkeypatch.setattr(scoring, "prepare", lambda *a: pytest.fail("files were read before the inputs were checked"))
    save_pngs(smooth(2, 8), tmp_path / "fake")
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "fake",
                             "--metrics", "l1,sem_consistency,style_relevance_global")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sem_consistency needs --conditions" in err and "style_relevance_global needs --exemplars" in err
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--metrics", "lpips_diversity")
    assert code == 2 and "lpips_diversity needs two or more --fake folders" in err
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "fake", "--metrics", "warp")
    assert code == 2 and "cannot score folders" in err
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "fake", "--metrics", "fdi")
    assert code == 2 and "unknown metric 'fdi'" in err


def test_argument_errors_exit_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench.score", "--metrics", "l1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "python -m bench.score: error: the following arguments are required: --fake (see --help)"]


def test_json_settings_provenance_and_mlflow_run(tmp_path, capsys):
    x = smooth(N, 9)
    save_pngs(x, tmp_path / "fake")
    save_pngs(x, tmp_path / "real")  # identical: L1 0, PSNR inf, LPIPS 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "real",
                               "--metrics", "l1,psnr,lpips_gt", "--allow-untrained-backbones", "--seed", 3,
                               "--json", tmp_path / "s.json", "--tracking-uri", uri, "--experiment", "scores",
                               "--run-name", "folders")
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["metrics"]["l1"] == 0.0 and doc["metrics"]["psnr"] == "inf" and abs(doc["metrics"]["lpips_gt"]) < 1e-6
    s = doc["settings"]
    assert s["n_images"] == N and s["resolution"] == "64x64" and s["seed"] == 3
    assert s["inputs.fake.files"] == N and s["inputs.fake.formats"] == "PNG:6" and s["inputs.fake.modes"] == "RGB:6"
    assert s["metric.lpips_gt.net"] == "alex" and s["metric.l1.data_range"] == 255
    assert doc["provenance"]["lpips_gt.lpips_alexnet_trunk"] == "untrained(seed=3)"
    assert doc["provenance"]["lpips_gt.lpips_lin_v0.1_alex"].startswith("sha256:")
    assert s["untrained_backbones"] == "lpips_gt.lpips_alexnet_trunk"
    assert "untrained" in next(line for line in out.splitlines() if line.startswith("lpips_gt"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("scores")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "folders" and run.info.run_id in out
    assert run.data.metrics["l1"] == 0.0 and run.data.metrics["lpips_gt"] == pytest.approx(doc["metrics"]["lpips_gt"])
    assert run.data.params["inputs.fake.formats"] == "PNG:6" and run.data.params["n_images"] == str(N)
    assert run.data.params["metric.lpips_gt.net"] == "alex"
    assert run.data.tags["bench.role"] == "score"
    assert run.data.tags["bench.weights.lpips_gt.lpips_alexnet_trunk"] == "untrained(seed=3)"
    assert run.data.tags["bench.untrained_backbones"] == "lpips_gt.lpips_alexnet_trunk"


def test_missing_weights_without_opt_in_is_an_error(tmp_path, capsys):
    save_pngs(smooth(2, 10), tmp_path / "fake")
    code, _, err = run_score(capsys, "--fake", tmp_path / "fake", "--real", tmp_path / "fake", "--metrics",
                             "lpips_gt", "--no-download")
    assert code == 2 and "alexnet-owt-7be5be79.pth" in err and "--allow-untrained-backbones" in err


def test_lpips_diversity_from_k_folders(tmp_path, capsys):
    outs = [smooth(4, 20 + k) for k in range(3)]
    exemplars = [smooth(4, 30 + k) for k in range(3)]
    exemplars[2][1] = exemplars[0][1]  # input 1 saw the same exemplar in folders 1 and 3: that pair is skipped
    for k in range(3):
        save_pngs(outs[k], tmp_path / f"out{k}")
        save_pngs(exemplars[k], tmp_path / f"ex{k}")
    args = [a for k in range(3) for a in ("--fake", tmp_path / f"out{k}")]
    code, _, err = run_score(capsys, *args, *[a for k in range(3) for a in ("--exemplars", tmp_path / f"ex{k}")],
                             "--metrics", "lpips_diversity", "--allow-untrained-backbones", "--batch-size", 3,
                             "--json", tmp_path / "s.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    # independent: the lpips network called directly on the saved PNGs, lpips' own im2tensor
    import lpips

    net, _ = L.load_lpips(BackboneSettings(allow_untrained=True, download=False), torch.device("cpu"))
    read = lambda k, i: lpips.im2tensor(np.asarray(Image.open(tmp_path / f"out{k}" / f"{i:03d}.png")))  # noqa: E731
    per_input = []
    for i in range(4):
        pairs = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if not (i == 1 and (a, b) == (0, 2))]
        with torch.no_grad():
            per_input.append(np.mean([float(net(read(a, i), read(b, i))) for a, b in pairs]))
    assert doc["metrics"]["lpips_diversity"] == pytest.approx(np.mean(per_input), rel=1e-5)
    s = doc["settings"]
    assert s["metric.lpips_diversity.k"] == 3 and s["metric.lpips_diversity.pairs"] == 11
    assert s["metric.lpips_diversity.pairs_skipped_same_exemplar"] == 1


def test_fid_and_kid_need_two_images(tmp_path, capsys):
    save_pngs(smooth(1, 11), tmp_path / "one")
    code, _, err = run_score(capsys, "--fake", tmp_path / "one", "--real", tmp_path / "one", "--metrics", "fid,kid")
    assert code == 2 and "fid_sources, kid_sources need at least 2 images per folder; got 1" in err
