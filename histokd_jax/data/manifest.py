"""Slide manifests: a CSV ``slide,label,split[,mpp]`` naming the slides of an experiment.

- ``slide``: a path, relative to the manifest's folder or absolute;
- ``label``: a class name from the config, or empty for an unlabelled slide (used
  by distillation only; its tiles carry no label);
- ``split``: ``train``, ``val`` or ``test``;
- ``mpp``: optional µm/px of level 0, overriding what the slide file says.

Tiles inherit their slide's label (weak labels). Structural problems (columns,
unknown classes or splits, bad numbers, duplicates) are reported all at once,
with line numbers, before any compute; a slide file that is missing or unreadable
is not a manifest error: it is skipped later with a reason.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")
REQUIRED = ("slide", "label", "split")


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    path: pathlib.Path
    label: str | None  # None: unlabelled
    split: str
    mpp: float | None  # None: read from the slide
    line: int  # line in the manifest, for messages


def read_manifest(path: str | pathlib.Path, *, class_names: Sequence[str]) -> list[SlideEntry]:
    """Parse and validate a manifest; raise one ValueError listing every problem found."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no slide manifest at {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header must be slide,label,split[,mpp]")
        rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k}, line) for line, row in
                enumerate(reader, start=2)]

    entries, problems, seen = [], [], {}
    for row, line in rows:
        if not any(row.values()):
            continue  # blank line
        where = f"line {line}"
        slide = row["slide"]
        if not slide:
            problems.append(f"{where}: empty slide path")
            continue
        slide_path = pathlib.Path(slide) if pathlib.Path(slide).is_absolute() else path.parent / slide
        label = row["label"] or None
        if label is not None and label not in class_names:
            problems.append(f"{where}: class {label!r} is not among the config's classes {list(class_names)}")
        split = row["split"]
        if split not in SPLITS:
            problems.append(f"{where}: split {split!r} is not one of {SPLITS}")
        if label is None and split != "train":
            problems.append(f"{where}: an unlabelled slide can only be in split 'train' (got {split!r})")
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not mpp > 0:
                problems.append(f"{where}: mpp {row['mpp']!r} is not a positive number of µm per pixel")
        key = slide_path.resolve()
        if key in seen:
            problems.append(f"{where}: slide {slide} already listed on line {seen[key]}")
        seen[key] = line
        entries.append(SlideEntry(path=slide_path, label=label, split=split, mpp=mpp, line=line))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{path} has {len(problems)} problem(s):\n  {shown}")
    if not entries:
        raise ValueError(f"{path} lists no slides")
    return entries
