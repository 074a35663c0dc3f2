"""notebooks/colab_tpu.ipynb: it is what its generator writes, its guarded cells take the right branch,
and it runs top to bottom on CPU with its small settings (as CI runs it)."""

from __future__ import annotations

import base64
import importlib.util
import pathlib
import re
import sys
import types

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
GENERATOR = REPO / "notebooks" / "make_colab_tpu.py"


def generator():
    spec = importlib.util.spec_from_file_location("make_colab_tpu", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_cell(nb, needle: str) -> str:
    """The source of the one code cell that contains ``needle``."""
    found = [c.source for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, (needle, len(found))
    return found[0]


def test_committed_notebook_is_what_the_generator_writes():
    gen = generator()
    assert gen.NOTEBOOK.read_text() == gen.render(), "run: python notebooks/make_colab_tpu.py"
    nb = nbformat.read(gen.NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.accelerator == "TPU"
    assert [c for c in nb.cells if c.cell_type == "code" and c.get("outputs")] == [], "commit it without outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    # every code cell is explained by the markdown cell before it
    for before, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", cell.source[:60]


def test_tpu_cell_switches_to_bfloat16_and_a_per_core_batch_only_on_a_tpu(capsys):
    source = code_cell(generator().build(), 'backend == "tpu"')
    tpu = {"backend": "tpu", "devices": [object()] * 8}
    exec(source, tpu)  # noqa: S102
    assert (tpu["COMPUTE_DTYPE"], tpu["TRAIN_BATCH"]) == ("bfloat16", 512)
    cpu = {"backend": "cpu", "devices": [object()]}
    exec(source, cpu)  # noqa: S102
    assert (cpu["COMPUTE_DTYPE"], cpu["TRAIN_BATCH"]) == ("float32", None)
    assert "not a TPU runtime: keeping float32 and the small CPU settings" in capsys.readouterr().out


def test_install_cell_on_colab_refuses_the_placeholder_url(monkeypatch):
    source = code_cell(generator().build(), "REPO_URL =")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    with pytest.raises(ValueError, match="set REPO_URL"):
        exec(source, {})  # noqa: S102  (raises before any clone or pip)


def test_install_cell_outside_colab_skips_installing_and_says_so(monkeypatch, tmp_path, capsys):
    source = code_cell(generator().build(), "REPO_URL =")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(REPO / "notebooks")
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102
    assert namespace["REPO_DIR"] == REPO and str(REPO) in sys.path
    assert "not on Colab: installation skipped" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # not a checkout: a clear error, not a confusing import failure later
    with pytest.raises(FileNotFoundError, match="not inside a histokd_jax checkout"):
        exec(source, {})  # noqa: S102


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out:
                parts.append(out.data.get("text/plain", "") + out.data.get("text/markdown", ""))
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    nb = nbformat.read(REPO / "notebooks" / "colab_tpu.ipynb", as_version=4)
    # As papermill does: a cell after the one tagged "parameters" overrides its values.
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    workdir = tmp_path / "work"
    injected = nbformat.v4.new_code_cell(f"WORKDIR = {str(workdir)!r}")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits it: the CPU path even on a GPU machine
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"the notebook failed:\n{error}")

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    text = outputs_text(nb)
    assert "not on Colab: installation skipped" in text
    assert "backend: cpu" in text and "not a TPU runtime: keeping float32 and the small CPU settings" in text
    loop_steps = int(re.search(r"^LOOP_STEPS = (\d+)", code_cell(nb, "LOOP_STEPS ="), re.M).group(1))
    assert len(re.findall(r"^teacher step +\d+: loss \d+\.\d+", text, re.M)) == loop_steps
    assert len(re.findall(r"^student step +\d+: loss \d+\.\d+ \(KL", text, re.M)) == loop_steps
    # the teacher / student table (trainer.format_table) and the paper-style table with intervals
    assert re.search(r"^teacher +64 +1 +[01]\.\d{3}", text, re.M), text[-3000:]
    assert re.search(r"^distill +16 +4 +[01]\.\d{3}", text, re.M), text[-3000:]
    assert re.search(r"^teacher / student FLOPs: \d+\.\dx", text, re.M)
    assert "| distill | 2.5x |" in text
    pngs = [o.data["image/png"] for c in nb.cells for o in c.get("outputs", [])
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    # everything went under the given workdir
    assert (workdir / "results.json").exists() and len(list((workdir / "predictions").glob("*.heatmap.png"))) == 1
