"""The README's programmatic example runs as written, and its two commands stay the documented ones."""

from __future__ import annotations

import math
import os
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_api_example_runs_one_distillation_step(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README lost its programmatic example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    metrics = namespace["metrics"]
    assert set(metrics) >= {"loss", "kl", "feature", "agreement"}
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert int(namespace["student_state"].step) == 1


def test_readme_python_blocks_run_as_scripts_outside_the_checkout(tmp_path):
    """Copied into a file anywhere (here a temporary folder, not the repository's), each block runs:
    nothing it imports may live only in the checkout (``from configs import ...`` did)."""
    import subprocess
    import sys

    for i, block in enumerate(python_blocks(README.read_text())):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(block)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"README block {i} failed outside the checkout:\n{done.stderr[-2000:]}"
    assert "'agreement'" in done.stdout  # the distillation example printed its metrics


def test_readme_states_the_two_commands_and_ci_runs_them():
    text = README.read_text()
    install = 'pip install -e ".[test]" && python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo'
    assert install in text
    assert "python -m pytest -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[test]"' in ci and "python -m pytest -q" in ci


STAGES = ("teacher", "distill", "baseline", "control")


def config_table(text: str) -> list[tuple[str, str]]:
    """(field cell, meaning cell) of each row of the README's configuration table."""
    body = text.split("## Configuration", 1)[1].split("| field | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ", 1) for line in body.splitlines() if line.startswith("| `")]
    return [(field.removeprefix("| "), meaning.removesuffix(" |")) for field, meaning in rows]


def fields_listed(rows: list[tuple[str, str]], leaves: set[str]) -> tuple[set[str], list[str]]:
    """(config fields the table names, names it lists that are no field). ``<stage>.x`` stands for every
    stage's ``x``; ``section.*`` lists the section's fields named in backticks in the meaning cell."""
    listed, unknown = set(), []
    for field, meaning in rows:
        for name in re.findall(r"`([^`]+)`", field):
            for full in ([name.replace("<stage>", s) for s in STAGES] if "<stage>" in name else [name]):
                if full.endswith(".*"):
                    section = full[:-2]
                    inside = {leaf for leaf in leaves if leaf.startswith(section + ".")}
                    if not inside:
                        unknown.append(full)
                    listed |= {f"{section}.{n}" for n in re.findall(r"`(\w+)`", meaning)} & inside
                elif full in leaves:
                    listed.add(full)
                else:
                    unknown.append(full)
    return listed, unknown


def config_leaves() -> set[str]:
    from histokd_jax.configs import common

    def walk(node, prefix=""):
        for key, value in node.items():
            yield from walk(value, f"{prefix}{key}.") if hasattr(value, "items") else [f"{prefix}{key}"]

    return set(walk(common.get_config()))


def test_the_configuration_table_checker_catches_both_directions():
    leaves = {"seed", "data.kind", "data.root", "train.bootstrap", "train.progress", "teacher.steps",
              "distill.steps", "baseline.steps", "control.steps"}
    rows = [("`seed`, `data.kind`", "x"), ("`<stage>.steps`", "per stage"), ("`train.*`", "`bootstrap`, `l2`"),
            ("`data.nonexistent`", "a field the config lost")]
    listed, unknown = fields_listed(rows, leaves)
    assert unknown == ["data.nonexistent"]
    assert leaves - listed == {"data.root", "train.progress"}


def test_the_configuration_table_lists_every_field_of_common_and_no_other():
    leaves = config_leaves()
    rows = config_table(README.read_text())
    assert len(rows) > 20
    listed, unknown = fields_listed(rows, leaves)
    assert not unknown, f"the README's configuration table lists fields configs/common.py lacks: {unknown}"
    missing = sorted(leaves - listed)
    assert not missing, f"fields of configs/common.py missing from the README's configuration table: {missing}"
