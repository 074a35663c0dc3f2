"""The stages' names: each is the config section, the workdir folder and the results row's role.

Before 2026-12-06 the three students' folders were ``student_kd/``, ``student_baseline/`` and
``student_control/``; a workdir that still has them is refused with the commands that rename them,
rather than retrained from scratch beside them.
"""

from __future__ import annotations

import pathlib
import shlex

STAGE_NAMES = ("teacher", "distill", "baseline", "control")  # also the order of every table
STAGE_ORDER = {name: i for i, name in enumerate(STAGE_NAMES)}
OLD_FOLDERS = {"student_kd": "distill", "student_baseline": "baseline", "student_control": "control"}


def check_no_old_folders(workdir: str | pathlib.Path) -> None:
    """Refuse a workdir (or a sweep of them) made before the students' folders were renamed."""
    root = pathlib.Path(workdir)
    if not root.is_dir():
        return
    # a run, a sweep (f4/distill) or a reproduction (seed0/f4/distill): not a walk of every checkpoint
    found = sorted(p for old in OLD_FOLDERS for depth in ("", "*/", "*/*/") for p in root.glob(f"{depth}{old}")
                   if p.is_dir())
    if found:
        moves = "\n".join(f"  mv {shlex.quote(str(p))} {shlex.quote(str(p.with_name(OLD_FOLDERS[p.name])))}"
                          for p in found)
        raise ValueError(f"{root} was made by an older histokd_jax whose student folders had other names; "
                         f"rename them to resume or reuse it:\n{moves}")
