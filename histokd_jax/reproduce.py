"""The paper's experiments on the multi-scale benchmark: one resolution sweep per seed, one table, the
claims checked against the figures measured.

Layout of a reproduction workdir::

    seed0/ ...            a whole sweep (histokd_jax/sweep.py) with data.seed = seed = 0
    seed1/ ...
    reproduce.md, .json   both seeds side by side, and each claim of the paper with its measured margin
    plots/accuracy_vs_gflops.png, plots/accuracy_vs_pool.png

Every seed is an ordinary sweep workdir, so rerunning resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from histokd_jax import atomic, metrics, plots, report, sweep


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The sweep of one seed: new data (``data.seed``) and new initialisation and order (``seed``)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = int(seed)
    c.data.seed = int(seed)
    return c


@dataclasses.dataclass(frozen=True)
class Claim:
    """One figure the benchmark must reach: ``margin >= 0`` where it holds (``> 0`` for a strict target).
    A missing model makes the margin NaN: the claim does not hold."""

    name: str
    target: str
    margin: float  # how far past the target (negative: short of it), in accuracy units
    detail: str
    strict: bool = False

    @property
    def holds(self) -> bool:
        return bool(self.margin > 0 if self.strict else self.margin >= 0)


def _acc(rows: Sequence[dict], *, role: str, factor: int = 1, pool: float | None = None) -> float:
    for r in rows:
        if r["role"] == role and r["factor"] == factor and (pool is None or r["pool"] == pool):
            return float(r["accuracy"])
    return float("nan")


def _least(*values: float) -> float:
    """The smallest value, NaN if any is NaN (the builtin ``min`` depends on the order then)."""
    return float(np.min(values))


def claims(rows: Sequence[dict], *, low: int = 8, mid: int = 4, high: int = 2) -> list[Claim]:
    """The issue's targets for one seed's sweep rows (teacher at factor 1; students at high/mid/low factors)."""
    teacher = _acc(rows, role="teacher")
    kd = {f: _acc(rows, role="distill", factor=f, pool=1.0) for f in (high, mid, low)}
    base = {f: _acc(rows, role="baseline", factor=f) for f in (high, mid, low)}
    ctrl = {f: _acc(rows, role="control", factor=f) for f in (high, mid, low)}
    pool = {p: _acc(rows, role="distill", factor=mid, pool=p) for p in (0.0, 0.25, 0.5, 1.0)}
    out = [
        Claim("teacher in range", "0.90 <= teacher <= 0.97", _least(teacher - 0.90, 0.97 - teacher),
              f"teacher {teacher:.3f}"),
        Claim(f"resolution costs (1/{low})", "teacher - control >= 0.05", teacher - ctrl[low] - 0.05,
              f"teacher {teacher:.3f}, control {ctrl[low]:.3f}"),
        Claim(f"labels are scarce (1/{mid})", "control - baseline >= 0.05", ctrl[mid] - base[mid] - 0.05,
              f"control {ctrl[mid]:.3f}, baseline {base[mid]:.3f}"),
    ]
    for f in (mid, low):
        out.append(Claim(f"KD beats baseline (1/{f})", "KD - baseline >= 0.03", kd[f] - base[f] - 0.03,
                         f"KD {kd[f]:.3f}, baseline {base[f]:.3f}"))
    for f in (high, mid, low):
        out.append(Claim(f"KD near control (1/{f})", "KD >= control - 0.02", kd[f] - ctrl[f] + 0.02,
                         f"KD {kd[f]:.3f}, control {ctrl[f]:.3f}"))
    out.append(Claim(f"KD near teacher (1/{high})", "KD >= teacher - 0.01", kd[high] - teacher + 0.01,
                     f"KD {kd[high]:.3f}, teacher {teacher:.3f}"))
    out.append(Claim(f"more pool helps (1/{mid})", "KD(0%) < KD(25%) < KD(100%)",
                     _least(pool[0.25] - pool[0.0], pool[1.0] - pool[0.25]),
                     ", ".join(f"{100 * p:.0f}%: {a:.3f}" for p, a in pool.items()), strict=True))
    return out


def _key(row: dict) -> str:
    return row["model"]


def paired_gains(seed_dir: pathlib.Path, rows: Sequence[dict], *, n_boot: int = 1000) -> dict[int, tuple]:
    """Per factor: the distilled student's accuracy minus the baseline's on the same test tiles, with a
    paired 95% interval resampling whole slides (narrower than the two models' own intervals)."""
    out = {}
    for factor in sorted({r["factor"] for r in rows if r["role"] == "baseline"}):
        kd, base = seed_dir / f"f{factor}" / "distill", seed_dir / f"f{factor}" / "baseline"
        if not (kd / report.PREDICTIONS).exists() or not (base / report.PREDICTIONS).exists():
            continue
        a, b = report.load_predictions(kd), report.load_predictions(base)
        out[factor] = metrics.paired_accuracy_difference(a["labels"], a["probs"], b["probs"], n_boot=n_boot,
                                                         groups=a["slides"])
    return out


def format_tables(by_seed: dict[int, list[dict]], gains: dict[int, dict[int, tuple]] | None = None) -> str:
    """The models of every seed side by side, the paired KD - baseline differences, then the claims."""
    seeds = sorted(by_seed)
    first = by_seed[seeds[0]]
    index = {s: {_key(r): r for r in by_seed[s]} for s in seeds}
    head = "| model | magnification | input px | pool | " + " | ".join(
        f"accuracy seed {s} (95% CI)" for s in seeds) + " | mean accuracy | mean macro-F1 | GFLOPs/image | FLOP ratio | images/s |"
    lines = [head, "|" + "---|" * (9 + len(seeds) - 1 + 1)]
    for r in first:
        cells = [index[s].get(_key(r)) for s in seeds]
        accs = [c["accuracy"] for c in cells if c]
        f1s = [c["macro_f1"] for c in cells if c]
        mag = f"{r['magnification']:.3g}x" if r["magnification"] else f"1/{r['factor']}"
        pool = "" if r["pool"] is None else f"{100 * r['pool']:.0f}%"
        per_seed = " | ".join("" if c is None else f"{c['accuracy']:.3f} [{c['accuracy_ci95'][0]:.3f}, "
                              f"{c['accuracy_ci95'][1]:.3f}]" for c in cells)
        speed = "" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        ratio = "" if r["flop_ratio"] is None else f"{r['flop_ratio']:.1f}"
        lines.append(f"| {r['model']} | {mag} | {r['input_px']} | {pool} | {per_seed} | {np.mean(accs):.3f} | "
                     f"{np.mean(f1s):.3f} | {r['gflops_per_image']:.4f} | {ratio} | {speed} |")
    if gains:
        factors = sorted({f for g in gains.values() for f in g})
        lines += ["", "| distilled - baseline (paired, 95% CI over slides) | " + " | ".join(
            f"seed {s}" for s in seeds) + " |", "|" + "---|" * (1 + len(seeds))]
        for f in factors:
            cells = [gains.get(s, {}).get(f) for s in seeds]
            lines.append(f"| 1/{f} | " + " | ".join("" if c is None else f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]"
                                                   for c in cells) + " |")
    lines += ["", "| claim | target | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|" + "---|" * (2 + len(seeds))]
    per_seed_claims = {s: claims(by_seed[s]) for s in seeds}
    for i, claim in enumerate(per_seed_claims[seeds[0]]):
        cells = []
        for s in seeds:
            c = per_seed_claims[s][i]
            cells.append(f"{'holds' if c.holds else 'MISSED'} ({c.margin:+.3f}; {c.detail})")
        lines.append(f"| {claim.name} | {claim.target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(workdir: str | pathlib.Path, by_seed: dict[int, list[dict]], *, n_boot: int = 1000) -> str:
    """``reproduce.md``/``reproduce.json`` and the two plots; returns the Markdown."""
    workdir = pathlib.Path(workdir)
    gains = {s: paired_gains(workdir / f"seed{s}", rows, n_boot=n_boot) for s, rows in by_seed.items()}
    text = format_tables(by_seed, gains)
    atomic.write_json(workdir / "reproduce.json", {
        "rows": {str(s): rows for s, rows in by_seed.items()},
        "kd_minus_baseline": {str(s): {str(f): list(v) for f, v in g.items()} for s, g in gains.items()},
        "claims": {str(s): [dataclasses.asdict(c) | {"holds": c.holds} for c in claims(rows)]
                   for s, rows in by_seed.items()}}, indent=1)
    atomic.write_text(workdir / "reproduce.md", "# Reproduction on the multi-scale benchmark\n\n" + text + "\n")
    (workdir / "plots").mkdir(exist_ok=True)
    labels = {"teacher": "teacher", "distill": "distilled", "baseline": "baseline (labels only)",
              "control": "control (true pool labels)"}
    points = [{"name": r["model"], "group": f"{labels.get(r['role'], r['role'])}, seed {s}",
               "gflops": r["gflops_per_image"], "accuracy": r["accuracy"], "ci95": r["accuracy_ci95"]}
              for s, rows in sorted(by_seed.items()) for r in rows if r["pool"] in (None, 1.0)]
    plots.accuracy_vs_gflops(workdir / "plots" / "accuracy_vs_gflops.png", points,
                             title="multi-scale benchmark: accuracy vs cost")
    mid = 4
    series = {f"seed {s}": [(r["pool"], r["accuracy"], r["accuracy_ci95"]) for r in rows
                            if r["role"] == "distill" and r["factor"] == mid] for s, rows in sorted(by_seed.items())}
    refs = {f"{name}, seed {s}": _acc(rows, role=role, factor=mid) for s, rows in sorted(by_seed.items())
            for role, name in (("baseline", "baseline"), ("control", "control"))}
    plots.accuracy_vs_pool(workdir / "plots" / "accuracy_vs_pool.png", series, references=refs,
                           title=f"distilled student at 1/{mid}: accuracy vs unlabelled pool")
    return text


def run_reproduction(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, seeds: Sequence[int],
                     should_stop: Callable[[str, int], bool] | None = None, config_name: str = "this config",
                     n_boot: int = 1000) -> str | None:
    """Run (or resume) every seed's sweep, then write the summary; None if stopped part-way."""
    workdir = pathlib.Path(workdir).absolute()
    by_seed = {}
    for seed in seeds:
        rows = sweep.run_sweep(seed_config(config, seed), workdir / f"seed{int(seed)}", should_stop=should_stop,
                               config_name=config_name, n_boot=n_boot)
        if rows is None:
            return None
        by_seed[int(seed)] = rows
    return write_summary(workdir, by_seed, n_boot=n_boot)
