"""Scalars to TensorBoard (tensorboardX, no TensorFlow) and to a JSONL file; process 0 writes."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np


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

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
