"""What the user watches: a line per trial report, and a summary table at the end."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

from ray.tune import Callback

# Final metrics shown in the summary table when present (the rest are in MLflow).
SUMMARY_METRICS = ("l1", "psnr", "ssim", "fid_sources", "swd", "lpips_diversity", "sem_consistency",
                   "style_color")


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressPrinter(Callback):
    """Driver-side Tune callback: ``[method/variant/dataset/sN] step 40/200 loss 2.31 3.2 it/s ETA 0:00:50``."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

    def _name(self, trial) -> str:
        from bench.sweep import TrialConfig

        try:
            return TrialConfig.from_dict(trial.config.get("trial", {})).name
        except Exception:  # noqa: BLE001 - a name is only cosmetic
            return str(trial)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.log(f"[{self._name(trial)}] started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        status = result.get("status")
        name = self._name(trial)
        if status == "TRAINING":
            self.log(f"[{name}] step {result['step']}/{result['steps']} loss {result['loss']:.4g} "
                     f"{result['it_per_s']:.2f} it/s ETA {_fmt_time(result.get('eta_s'))}")
        elif status == "FINISHED":
            finals = {k.split('/', 1)[1]: v for k, v in result.items() if k.startswith("final/")}
            shown = " ".join(f"{k} {finals[k]:.4g}" for k in SUMMARY_METRICS if k in finals)
            self.log(f"[{name}] finished in {_fmt_time(result.get('wall_s'))}  {shown}")
        elif status in ("DIVERGED", "SKIPPED"):
            self.log(f"[{name}] {status}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"[{self._name(trial)}] FAILED (traceback in its MLflow run, artifact traceback.txt)")


def summary_table(rows: List[Tuple[str, str, Optional[float], Dict[str, Any]]]) -> str:
    """rows: (trial name, status, wall seconds, metrics) -> an aligned text table."""
    cols = [m for m in SUMMARY_METRICS if any(m in r[3] for r in rows)]
    header = ["trial", "status", "wall"] + cols
    body = []
    for name, status, wall, metrics in rows:
        body.append([name, status, _fmt_time(wall)] + [f"{metrics[c]:.4g}" if c in metrics else "-" for c in cols])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])
