"""Run logging: `metrics.jsonl`, TensorBoard events and a console progress line, from the main process only.

`metrics.jsonl` has one JSON object per `log` call (`{"step": ..., "loss/total": ..., ...}`; the training loop logs
once per logged step and once per kNN evaluation). A resumed run first drops the lines beyond the step it resumes
from, and hides the TensorBoard events beyond it, so both always describe one trajectory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opendino import dist

__all__ = ["MetricLogger", "format_duration", "read_metrics"]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (a torn last line, from a killed run, is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricLogger:
    """Writes metric records to `metrics.jsonl`, TensorBoard and the console (main process only)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: str = "auto",
    ) -> None:
        self.active = dist.is_main()
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self._t0 = time.perf_counter()
        self._start_step = start_step
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Hide the events a killed run wrote after the checkpoint this one resumes from (it logs from
            # start_step + 1 on); a fresh start hides those of a run killed before its first checkpoint.
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        mode = progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="it", file=sys.stderr)

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """Write one record (numbers; non-finite values are written as strings "nan" / "inf")."""
        if not self.active:
            return
        clean = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def progress(self, step: int, summary: str) -> None:
        """Advance the bar to `step` with `summary`, or print a line (mode `line`)."""
        if not self.active or self.mode == "none":
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            done = step - self._start_step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
            print(f"[{step}/{self.total_steps}] {summary} | ETA {format_duration(eta)}", flush=True)

    def message(self, text: str) -> None:
        """A line for the user (warnings, evaluation results), above the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
