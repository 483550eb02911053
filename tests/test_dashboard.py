"""The MLflow UI shows a sweep the way the README promises, checked with a real headless browser.

``mlflow ui`` serves a store on 127.0.0.1 (a free port, one worker, no job runner), a toy sweep
runs through Ray and logs to it over http, and Debian's chromium, driven over the DevTools
protocol, opens the link the sweep printed at its end (MLflow 3.17 opens an experiment in its
GenAI view unless the link asks for the runs): the runs table lists the sweep's parent run and,
expanded, its trials by their readable names; a trial's page shows its params and metrics; its
sample grid renders as an image. The server and the browser are started in their own process
groups and stopped in fixture teardown, so nothing outlives the test.

Chromium is installed with apt-get when missing (as root); the test skips, with the reason, only
when that is impossible.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from bench.report import build_report
from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, spec_from_dict
from bench.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, browse_message
from tests.mlflow_server import group_alive, mlflow_ui, stop_group  # noqa: F401 - mlflow_ui is a fixture

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900"]
WAIT_S = 60  # per page; the React app renders in 1-3 s on an idle machine


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"chromium install timed out: {' '.join(cmd)}")
        log.append(r.stdout[-1500:] + r.stderr[-1500:])
        if r.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(cmd)} exited {r.returncode}): {log[-1][-500:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get install chromium succeeded but no chromium binary is on PATH")
    return found


# ---- a small DevTools-protocol client (aiohttp ships with mlflow) -------------------------------
class Browser:
    def __init__(self, binary: str, profile: Path):
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.profile = profile
        self._id = 0

    async def connect(self):
        import aiohttp

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"chromium did not start (exit {self.proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)
        await self.call("Page.enable")

    async def call(self, method: str, **params):
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=30)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def wait_text(self, *needles: str, action: str = "", timeout: float = WAIT_S) -> str:
        """Poll the page's visible text until it holds every needle; ``action`` (JS) runs each poll
        (e.g. expanding a collapsed row once the table has rendered it)."""
        deadline = time.time() + timeout
        text = ""
        while time.time() < deadline:
            text = await self.js("document.body ? document.body.innerText : ''") or ""
            if all(n in text for n in needles):
                return text
            if action:
                await self.js(action)
            await asyncio.sleep(0.4)
        raise AssertionError(f"page never showed {needles}; it shows: {text[:1500]!r}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        for closer in (getattr(self, "ws", None), getattr(self, "session", None)):
            if closer is not None:
                await closer.close()


@pytest.fixture()
def browser(chromium):
    profile = Path(tempfile.mkdtemp(prefix="bench_chromium_"))  # a fresh profile per test
    b = Browser(chromium, profile)
    yield b
    stop_group(b.proc)
    assert not group_alive(b.proc.pid), "chromium left processes behind"
    shutil.rmtree(profile, ignore_errors=True)


# ---- the test --------------------------------------------------------------------------------
EXPAND_PARENT = ("document.querySelectorAll('[role=\"gridcell\"][col-id^=\"attributes\"] button')"
                 ".forEach(b => { if (!b.dataset.benchClicked) { b.dataset.benchClicked = 1; b.click(); } })")


CLICK_RUN = ("[...document.querySelectorAll('a')].filter(a => a.textContent.trim() === %s)"
             ".slice(0, 1).map(a => (a.click(), a.getAttribute('href')))")


def test_the_printed_link_opens_the_sweeps_runs(ray_session, tmp_path, mlflow_ui, browser):
    base = mlflow_ui(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    raw = {"name": "dashboard_check", "seeds": [0, 1], "methods": [{"name": "toy"}],
           "datasets": [{"name": "embedded", "variant": "mask"}],
           "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2},
           "eval": {"num_samples": 4, "batch_size": 4, "metrics": ["l1", "psnr", "ssim"]},
           "scale": {"resolution": 32}, "resources": {"cpu": 1, "max_concurrent": 2}}
    trials = expand(spec_from_dict(raw))
    lines = []
    assert run_sweep("dashboard_check", trials, RunOptions(workdir=tmp_path, tracking_uri=base), log=lines.append) == 0
    build_report("dashboard_check", tracking_uri=base, workdir=tmp_path)  # logs report/ to the parent run too
    client = MlflowClient(base)
    exp = client.get_experiment_by_name("dashboard_check")
    assert exp.tags.get(EXPERIMENT_KIND_TAG) == MODEL_DEVELOPMENT
    # The sweep's last words: the link, as the function that prints it makes it, and nothing else
    # pointing into the UI (MLflow's per-run "View run" lines are printed by the trial workers, not
    # through this log; tests/test_output.py checks the real terminal output).
    assert lines[-1] == browse_message(base, exp.experiment_id)
    assert sum("/#/experiments/" in line for line in lines) == 1
    link = lines[-1].split("runs: ", 1)[1]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    names = sorted(t.name for t in trials)
    assert names == ["toy/default/embedded-mask/s0", "toy/default/embedded-mask/s1"]
    child = runs[names[0]]
    grid = Path(client.download_artifacts(child.info.run_id, "samples/grid.png", str(tmp_path)))
    grid_size = list(Image.open(grid).size)

    async def drive():
        await browser.connect()
        try:
            # The printed link: the runs table, the sweep's parent run expanded to its trials.
            await browser.open(link)
            await browser.wait_text("dashboard_check", "matching runs")
            text = await browser.wait_text(*names, action=EXPAND_PARENT)
            await browser.screenshot(tmp_path / "experiment_page.png")
            assert "3 matching runs" in text  # the parent and its two trials
            # ... in the "Model training" workflow (its side navigation), not under GenAI's
            # "Training runs", where MLflow 3.17 puts an experiment's runs by default.
            assert "Model registry" in text and "Observability" not in text, text[:800].replace("\n", " | ")
            # A trial, reached from the table: its page shows params and final metrics.
            clicked = await browser.js(CLICK_RUN % json.dumps(names[0]))
            assert clicked and child.info.run_id in clicked[0], f"no link to {names[0]} in the table: {clicked}"
            text = await browser.wait_text(names[0], "Parameters", "Metrics")
            for needle in ("method_options.quality", "scale.resolution", "psnr", "ssim", "l1"):
                assert needle in text, needle
            # Its sample grid renders as an image of the artifact's size.
            run_page = (await browser.js("location.href")).split("?")[0].rstrip("/")
            assert run_page.endswith(f"/runs/{child.info.run_id}"), run_page
            await browser.open(f"{run_page}/artifacts/samples/grid.png")
            deadline = time.time() + WAIT_S
            sizes = []
            while time.time() < deadline and grid_size not in sizes:
                sizes = await browser.js("[...document.images].map(i => [i.naturalWidth, i.naturalHeight])")
                await asyncio.sleep(0.4)
            assert grid_size in sizes, f"no {grid_size} image on the artifact page: {sizes}"
        finally:
            await browser.close()

    asyncio.run(drive())
