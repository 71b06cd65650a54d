"""What a run tells the world: TensorBoard events, a metrics JSONL, rollout samples, a progress bar.

Only process 0 writes; on other processes every method is a no-op, so trainers call them
unconditionally. Files in the workdir:
    workdir/tb/            TensorBoard event files (scalars; rollout samples as text)
    workdir/metrics.jsonl  one JSON object per logged step: {"step": s, "<name>": value, ...}
    workdir/samples.jsonl  a few rollouts per log step: {"step", "prompt", "response", "reward", ...}
    workdir/data_order.jsonl  record ids each step trained on: {"step", "ids"}
Appending (not truncating) keeps the history of a resumed run in one file.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricsWriter:
    """TensorBoard + JSONL writer and a tqdm progress bar with ETA and a few key metrics."""

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
                 key_metrics: Sequence[str] = ("loss",), progress_bar: bool = True,
                 description: str = "train"):
        self.active = jax.process_index() == 0
        self.key_metrics = tuple(key_metrics)
        self._tb = self._bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._samples = open(os.path.join(workdir, "samples.jsonl"), "a")
        self._data = open(os.path.join(workdir, "data_order.jsonl"), "a")
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description,
                             dynamic_ncols=True, smoothing=0.1)
        self._last_time = time.time()

    def write_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` at `step` to TB and JSONL; updates the progress-bar postfix."""
        if not self.active:
            return
        row = {k: _scalar(v) for k, v in metrics.items()}
        for k, v in row.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), **{
            k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}}) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            shown = {k: f"{row[k]:.4g}" for k in self.key_metrics if k in row}
            self._bar.set_postfix(shown, refresh=False)

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """A few rollouts (prompt, response, reward, ...) to samples.jsonl and TB text."""
        if not self.active or not samples:
            return
        lines = []
        for s in samples:
            row = {"step": int(step), **{k: (v.item() if isinstance(v, np.generic) else v)
                                         for k, v in s.items()}}
            self._samples.write(json.dumps(row, ensure_ascii=False) + "\n")
            lines.append("\n\n".join(f"**{k}**: {v}" for k, v in row.items() if k != "step"))
        self._samples.flush()
        self._tb.add_text("rollouts", "\n\n---\n\n".join(lines), step)

    def write_data_ids(self, step: int, ids: Sequence[str]) -> None:
        """The record ids a step trained on (data_order.jsonl): shows that a resumed run continues
        the data where it stopped, with nothing re-trained or skipped."""
        if not self.active:
            return
        self._data.write(json.dumps({"step": int(step), "ids": [str(i) for i in ids]}) + "\n")
        self._data.flush()

    def advance(self, n: int = 1) -> None:
        """Moves the progress bar by `n` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.flush()
        self._tb.close()
        self._jsonl.close()
        self._samples.close()
        self._data.close()
