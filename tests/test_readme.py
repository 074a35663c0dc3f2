"""The README's programmatic example runs as written, and its two commands stay the documented ones."""

from __future__ import annotations

import math
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


def test_readme_states_the_two_commands_and_ci_runs_them():
    text = README.read_text()
    install = 'pip install -e ".[test]" && python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo'
    assert install in text
    assert "python -m pytest -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[test]"' in ci and "python -m pytest -q" in ci
