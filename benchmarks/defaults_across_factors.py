"""Do the 2.5x ablations' winners hold at the other factors? The distilled student at 5x, 2.5x and 1.25x
under each pairing of temperature (1, 4) and views per crop (1, 2), from a reproduction's teacher.

    python launch/reproduce.py --workdir=/tmp/histokd-reproduce --seeds=0
    python benchmarks/defaults_across_factors.py --workdir=/tmp/histokd-reproduce --seed=0

Each cell is one 400-step distillation stage (``ablations.variant_config``, written under
``workdir/defaults_across_factors/seed<s>/``; rerunning resumes); it prints test accuracy per setting
and factor and the mean over factors. There is no target: the configs' defaults should be the setting
that is best across factors, not only at the ablations' 2.5x (BENCHMARKS.md, "Ablations").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histokd_jax.configs import benchmark  # noqa: E402
from histokd_jax import ablations, trainer  # noqa: E402
from histokd_jax.reproduce import seed_config  # noqa: E402

SETTINGS = {f"T{t}, {k} view{'s' if k > 1 else ''}": {"loss.temperature": float(t), "views_per_crop": k}
            for t in (1, 4) for k in (1, 2)}
FACTORS = (2, 4, 8)


def accuracy(config, overrides: dict, *, factor: int, teacher_dir: pathlib.Path, out: pathlib.Path) -> float:
    """Test accuracy of one distillation stage (trained unless ``out`` already holds it)."""
    cell = ablations.variant_config(config, overrides, factor=factor, teacher_dir=teacher_dir)
    if trainer.train_and_evaluate(cell, out) is None:
        raise SystemExit(f"stopped in {out}")
    return float(json.loads((out / "distill" / "result.json").read_text())["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a reproduction's workdir (its seed<s>/teacher is reused)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir).absolute()
    teacher_dir = workdir / f"seed{args.seed}" / "teacher"
    if not (teacher_dir / "result.json").exists():
        raise SystemExit(f"error: no finished teacher in {teacher_dir}: run launch/reproduce.py "
                         f"--workdir={workdir} --seeds={args.seed} first")
    config = seed_config(benchmark.get_config(), args.seed)
    rows = {}
    for name, overrides in SETTINGS.items():
        slug = name.replace(", ", "_").replace(" ", "")
        rows[name] = [accuracy(config, overrides, factor=f, teacher_dir=teacher_dir,
                               out=workdir / "defaults_across_factors" / f"seed{args.seed}" / f"f{f}_{slug}")
                      for f in FACTORS]
    print(f"\n| setting (seed {args.seed}) | " + " | ".join(f"1/{f}" for f in FACTORS) + " | mean |")
    print("|---|" + "---:|" * (len(FACTORS) + 1))
    for name, accs in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} |")


if __name__ == "__main__":  # the data loader spawns processes: keep module import side-effect free
    main()
