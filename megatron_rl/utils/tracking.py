"""Where a run's numbers go: a JSONL file, TensorBoard, Weights & Biases (when installed and enabled),
a one-line progress display per phase, and a PNG plot at the end. `TrackingConfig` is the job config's
`logging` section. Every rank may hold a Tracker; only the logging rank's is active (the others write
nothing), so the loop needs no rank test around it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PLOT_KEYS = (("reward/mean", "reward"), ("rollout/response_length_mean", "response length"),
             ("masked_frac", "masked fraction"), ("mismatch/prob_diff_mean", "|pi - mu| (sampled tokens)"))


@dataclass
class TrackingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_rl"
    progress: bool = True         # a line per phase and per step on stdout
    plot: bool = True             # run_dir/summary.png at the end (PLOT_KEYS against step)


class PhaseTimer:
    """Wall time per phase of one step: `with timer("generate"): ...`; `timer.metrics()`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str, progress: Optional["Tracker"] = None, step: int = 0):
        if progress is not None:
            progress.phase(step, phase)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        return out


class Tracker:
    """config: what to write; run_config: the job's whole config, given to W&B; active: False on the ranks
    that do not log (every method is then a no-op and `history` stays empty)."""

    def __init__(self, run_dir: str | Path, total_steps: int, config: Optional[TrackingConfig] = None,
                 run_config: Optional[dict] = None, stream=None, active: bool = True):
        self.dir = Path(run_dir)
        self.total = total_steps
        self.config = config = config or TrackingConfig()
        self.active = active
        self.show = active and config.progress
        self.stream = stream or sys.stdout
        self.history: list[dict] = []
        self._jsonl = self._tb = self._wandb = None
        if not active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            self._jsonl = open(self.dir / "metrics.jsonl", "a")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if config.wandb:
            try:
                import wandb as wb
            except ImportError:
                self._print("logging.wandb is true but wandb is not installed: not logging to W&B")
            else:
                self._wandb = wb.init(project=config.wandb_project, config=run_config or {}, dir=str(self.dir))

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def phase(self, step: int, phase: str) -> None:
        if self.show:
            self._print(f"[step {step + 1}/{self.total}] {phase} ...")

    def log(self, step: int, metrics: dict[str, float], timer: Optional[PhaseTimer] = None) -> None:
        """One row per step; with the step's `timer`, its phase times and the throughput (response tokens
        over the step's wall time) are added."""
        if not self.active:
            return
        if timer is not None:
            metrics = {**metrics, **timer.metrics()}
            metrics["throughput/tokens_per_second"] = metrics.get("rollout/response_tokens", 0) / max(
                metrics["time/step"], 1e-9)
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                if self._tb:
                    self._tb.add_scalar(k, v, step)
        if self._tb:
            self._tb.flush()
        if self._wandb:
            self._wandb.log(row, step=step)
        if self.show:
            tps = row.get("throughput/tokens_per_second", 0.0)
            self._print(f"[step {step + 1}/{self.total}] reward {row.get('reward/mean', float('nan')):.3f}  "
                        f"loss {row.get('loss', float('nan')):+.4f}  "
                        f"mask {row.get('masked_frac', float('nan')):.3f}  "
                        f"len {row.get('rollout/response_length_mean', 0):.1f}  {tps:.0f} tok/s  "
                        f"{row.get('time/step', 0):.1f}s")

    def plot(self, path: Optional[str | Path] = None) -> Optional[Path]:
        """Reward, response length, mask fraction and mismatch against step, one panel each."""
        if not self.history or not self.config.plot:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4 * len(PLOT_KEYS), 3.2))
        for ax, (key, title) in zip(axes, PLOT_KEYS):
            pts = [(r["step"], r[key]) for r in self.history if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker=".")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path) if path else self.dir / "summary.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def close(self) -> None:
        """The summary plot (logging.plot), then every writer closed."""
        self.plot()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def truncate_jsonl(path: str | Path, before_step: int) -> int:
    """Keep only the rows of `path` with "step" < before_step (and lines that parse: a kill mid-write
    leaves a torn last line), atomically: a temp file beside it, fsynced, renamed over it. A crash
    leaves the old file or the new one, never a mix. Returns how many rows were dropped (0: untouched)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1 if line.strip() else 0
            continue
        if isinstance(step, int) and step < before_step:
            kept.append(line)
        else:
            dropped += 1
    if not dropped:
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
