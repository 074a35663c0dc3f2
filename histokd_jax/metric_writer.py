"""Scalars to TensorBoard (tensorboardX, no TensorFlow) and to a JSONL file; process 0 writes."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from histokd_jax import atomic


class MetricWriter:
    """``write(stage, step, {name: value})`` -> ``workdir/tensorboard`` events + ``workdir/metrics.jsonl``."""

    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

            workdir = pathlib.Path(workdir)
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for name, value in clean.items():
            self._tb.add_scalar(f"{stage}/{name}", value, step)
        self._jsonl.write(json.dumps({"stage": stage, "step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def forget_after(self, stage: str, step: int) -> None:
        """Drop the rows of ``stage`` (and its ``stage/...`` series) after ``step``: a resumed stage redoes
        the steps since its checkpoint, which would otherwise stand twice in metrics.jsonl."""
        if not self.enabled:
            return
        path = pathlib.Path(self._jsonl.name)
        self._jsonl.close()
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

        def stale(line: str) -> bool:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill
                return True
            return str(row.get("stage", "")).split("/")[0] == stage and int(row.get("step", 0)) > step

        atomic.write_text(path, "".join(f"{line}\n" for line in rows if not stale(line)))
        self._jsonl = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
