"""Writes ``notebooks/colab_tpu.ipynb`` from the cells below, so the notebook's source is reviewable Python.

    python notebooks/make_colab_tpu.py          # rewrite the notebook
    python notebooks/make_colab_tpu.py --check  # exit 1 if the committed notebook differs

Edit the cells here, never the .ipynb by hand: ``tests/test_notebook.py`` fails when the two differ,
and executes the notebook top to bottom on CPU with its small settings.
"""

from __future__ import annotations

import pathlib
import sys
import textwrap

import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().with_name("colab_tpu.ipynb")

# (kind, source, tags): "md" or "code"; the cell id is its position, so the output is deterministic.
CELLS: list[tuple[str, str, tuple[str, ...]]] = []


def md(source: str) -> None:
    CELLS.append(("md", textwrap.dedent(source).strip(), ()))


def code(source: str, *tags: str) -> None:
    CELLS.append(("code", textwrap.dedent(source).strip(), tags))


md("""
    # histokd_jax on a Colab TPU (or GPU, or CPU)

    Resolution-based knowledge distillation for digital pathology: a **teacher** learns from
    labelled 10x tiles, a **student** of the same architecture learns to reproduce it from the
    same tissue at 2.5x (16x fewer pixels). This notebook

    1. installs the package from its repository (on Colab),
    2. detects the backend (TPU / GPU / CPU) and builds the device mesh,
    3. loads the demo config (synthetic whole slides read through OpenSlide),
    4. **calls the step functions directly**: a teacher trained by `steps.supervised_step` and a
       student distilled by `steps.distill_step`, in plain Python loops,
    5. **runs the whole method in one call** (`experiment.train_and_report`) and shows the
       teacher / student table and the student's heatmap of a test slide.

    On a CPU it uses small settings (tiny slides, narrow model, a few dozen steps: about two
    minutes on 2 cores); CI executes it that way on every change, so it keeps working. On an
    accelerator it trains the demo as configured. Colab: *Runtime > Change runtime type > TPU*.
""")

md("""
    ## Install

    On Colab the cell clones the repository (set `REPO_URL` to where it lives), installs it with
    its dependencies, and on a TPU runtime installs JAX's TPU build. Anywhere else (a checkout, CI)
    it installs nothing and says so: run `pip install -e ".[test]"` in the checkout instead.
    If Colab says that upgraded packages need a restart, restart the session and run all cells
    again (the clone is kept; the install is then a no-op).
""")

code("""
    REPO_URL = "https://github.com/<owner>/histokd_jax.git"  # placeholder: where this repository lives
    REPO_BRANCH = "main"

    import glob
    import os
    import pathlib
    import subprocess
    import sys

    IN_COLAB = "google.colab" in sys.modules
    # Before JAX is imported: Colab's TPU runtimes set COLAB_TPU_ADDR (TPU node) or show /dev/accel* (TPU VM).
    TPU_ENV = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME")
                   or os.environ.get("TPU_ACCELERATOR_TYPE") or glob.glob("/dev/accel*"))


    def pip(*args):
        print("pip install", *args)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


    def find_checkout(start):
        # The repository root above `start`: it holds both the package and configs/.
        for folder in (start, *start.parents):
            if (folder / "histokd_jax" / "__init__.py").exists() and (folder / "configs" / "demo.py").exists():
                return folder
        return None


    if IN_COLAB:
        if "<owner>" in REPO_URL:
            raise ValueError("set REPO_URL (first line of this cell) to the git URL of the histokd_jax repository")
        REPO_DIR = pathlib.Path("/content/histokd_jax")
        if not REPO_DIR.exists():
            subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", REPO_BRANCH, REPO_URL, str(REPO_DIR)],
                           check=True)
        pip("-e", str(REPO_DIR))
        if TPU_ENV:
            pip("-U", "jax[tpu]")
        else:
            print("no TPU runtime detected: keeping the JAX build that the package installed")
    else:
        REPO_DIR = find_checkout(pathlib.Path.cwd().resolve())
        if REPO_DIR is None:
            raise FileNotFoundError("not on Colab and not inside a histokd_jax checkout: start Jupyter in the "
                                    "repository (after pip install -e '.[test]') or set REPO_DIR")
        print(f"not on Colab: installation skipped (using the checkout at {REPO_DIR}; "
              "install it with pip install -e '.[test]')")

    # configs/ is not part of the installed package: import it (and the package) from the checkout.
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
""")

md("""
    ## Detect the backend

    `jax.default_backend()` is `tpu`, `gpu` or `cpu`; all devices of all processes form the mesh.
""")

code("""
    import jax

    backend = jax.default_backend()
    devices = jax.devices()
    ACCELERATOR = backend in ("tpu", "gpu")
    print(f"backend: {backend}")
    print(f"devices: {len(devices)} x {', '.join(sorted({d.device_kind for d in devices}))} "
          f"({jax.process_count()} process(es)); JAX {jax.__version__}")
    if TPU_ENV and backend != "tpu":
        print("warning: this looks like a TPU runtime but JAX does not see the TPU; restart the runtime "
              "(Runtime > Restart session) so the freshly installed jax[tpu] is imported")
""")

md("""
    ### TPU only: bfloat16 compute and bigger batches

    TPUs compute in bfloat16 at full speed: the model then runs its convolutions in bfloat16 while
    parameters, GroupNorm statistics and losses stay float32 (`model.compute_dtype`). The global
    batch grows with the number of TPU cores. Other backends keep float32 (bfloat16 is slower on
    CPUs without bfloat16 units).
""")

code("""
    if backend == "tpu":
        COMPUTE_DTYPE = "bfloat16"
        TRAIN_BATCH = 64 * len(devices)  # global batch of every stage: 64 per TPU core
        print(f"TPU runtime: bfloat16 compute, global batch {TRAIN_BATCH}")
    else:
        COMPUTE_DTYPE = "float32"
        TRAIN_BATCH = None  # keep the config's batch sizes
        if backend == "gpu":
            print("not a TPU runtime (gpu): keeping float32 and the demo's batch sizes")
        else:
            print("not a TPU runtime: keeping float32 and the small CPU settings")
""")

md("""
    ## Parameters

    Papermill can override this cell (it is tagged `parameters`). `SMALL = True` shrinks the demo
    so the whole notebook runs in about two minutes on a 2-core CPU; on an accelerator the default
    is the demo as configured (`configs/demo.py`: minutes on a TPU or GPU).
""")

code("""
    SMALL = not ACCELERATOR  # tiny slides, a narrow model and short stages
    WORKDIR = ""  # where everything is written; empty: a new temporary folder
    LOOP_STEPS = 10  # steps of each hand-written training loop below
    STAGE_STEPS = 20  # SMALL only: steps of each stage of the one-call run
    HEATMAP_SLIDES = 1  # test slides the distilled student maps at the end of the run
""", "parameters")

md("""
    ## Mesh and config

    One `('data',)` mesh axis over every device: batches are split over it, parameters and
    optimiser state are replicated. The config is `configs/demo.py`, a locked `ConfigDict`
    (a misspelt key raises); `SMALL` overrides a few of its fields.
""")

code("""
    import tempfile

    from absl import flags

    from histokd_jax.configs import demo
    from histokd_jax import parallel

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags, parsed only under absl.app.run

    mesh = parallel.make_mesh()
    print(mesh)

    workdir = pathlib.Path(WORKDIR or tempfile.mkdtemp(prefix="histokd-colab-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}")
    # Compiled programs are kept on disk: the one-call run below reuses those of the hand-written loops.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    print(f"compilation cache: {jax.config.jax_compilation_cache_dir}")

    config = demo.get_config()
    config.model.compute_dtype = COMPUTE_DTYPE
    config.train.heatmap_slides = HEATMAP_SLIDES
    if TRAIN_BATCH:
        config.update_from_flattened_dict({f"{s}.batch_size": TRAIN_BATCH for s in ("teacher", "distill", "baseline")})
        config.train.eval_batch_size = TRAIN_BATCH
    if SMALL:
        config.update_from_flattened_dict({
            "data.slides_per_class": 5,  # 3 train, 1 validation, 1 test slide per class
            "data.test_slides_per_class": 0,
            "data.n_unlabeled_slides": 2,
            "data.slide_tiles": 6,  # 6 x 6 tiles of 64 µm per slide
            "data.tile_px": 64,
            "data.teacher_px": 64,
            "model.widths": (8, 16, 16, 32),
            "model.num_groups": 4,
            "train.eval_batch_size": TRAIN_BATCH or 64,
            "train.log_every_steps": 5,
            "train.checkpoint_every_steps": STAGE_STEPS,
            "train.progress": False,
            "train.bootstrap": 50,
            "sweep.measure_batch_size": 256,  # the heatmap's batch: one compiled program serves both
        })
        for stage in ("teacher", "distill", "baseline"):
            config.update_from_flattened_dict({
                f"{stage}.steps": STAGE_STEPS,
                f"{stage}.batch_size": TRAIN_BATCH or 16,
                f"{stage}.eval_every_steps": STAGE_STEPS // 2,
                f"{stage}.optim.warmup_steps": 2,
            })
    print(f"teacher {config.data.teacher_magnification}, student {config.data.student_magnification}; "
          f"widths {tuple(config.model.widths)}, compute {config.model.compute_dtype}; "
          f"steps teacher/distill/baseline {config.teacher.steps}/{config.distill.steps}/{config.baseline.steps}")
""")

md("""
    ## The programmatic use: step functions in your own loop

    The library's step functions are pure and unjitted: bind their keyword-only dependencies
    (model, optimiser, loss) with `functools.partial`, then `jax.jit` them with the mesh's
    shardings: state replicated, batch split on `'data'`, the state donated. The first call
    compiles; the following ones are fast.

    First the data: the demo's synthetic slides are written under the workdir and indexed
    (tissue mask, a grid of 64 µm tiles); the training loaders are grain loaders of paired views
    (one augmented 10x crop, and the same crop downsampled 4x for the student).
""")

code("""
    import functools

    import numpy as np

    from histokd_jax import model_config, steps
    from histokd_jax.data.pipeline import make_train_loader
    from histokd_jax.data.splits import load_splits, view_spec
    from histokd_jax.optim import make_optimizer
    from histokd_jax.state import create_train_state, init_params

    splits = load_splits(config.data, workdir=workdir)
    print(f"classes {splits.class_names}; tiles {splits.counts}")
    train_spec, eval_spec = view_spec(config.data, train=True), view_spec(config.data, train=False)
    print(f"teacher sees {train_spec.teacher_px} px, student {train_spec.student_px} px "
          f"({train_spec.downsample}x downsample)")
    model = model_config.make_model(config, num_classes=len(splits.class_names))
    repl, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)


    def loader(source, batch_size, seed):
        # An endless shuffled iterator of this process's share of each global batch.
        per_process = parallel.check_batch_size(batch_size, mesh=mesh)
        return iter(make_train_loader(source, spec=train_spec, batch_size=per_process, seed=seed,
                                      workers=config.data.workers))
""")

md("""
    ### Teacher: `steps.supervised_step` on the labelled 10x tiles

    The stage's own optimiser (AdamW, warmup and cosine decay over `config.teacher.steps`), of
    which the loop runs the first `LOOP_STEPS` steps.
""")

code("""
    teacher_tx = make_optimizer(config.teacher.optim, total_steps=config.teacher.steps)
    teacher_state = parallel.put_replicated(
        create_train_state(init_params(model, rng=jax.random.key(config.seed), input_px=train_spec.teacher_px),
                           tx=teacher_tx), mesh=mesh)
    teacher_step = jax.jit(
        functools.partial(steps.supervised_step, model=model, tx=teacher_tx, image_key="teacher_image"),
        in_shardings=(repl, split), out_shardings=(repl, repl), donate_argnums=0)

    batches = loader(splits.train, config.teacher.batch_size, seed=config.seed)
    teacher_losses = []
    for step in range(1, LOOP_STEPS + 1):
        batch = parallel.put_batch(next(batches), mesh=mesh)
        teacher_state, metrics = teacher_step(teacher_state, batch)
        teacher_losses.append(float(metrics["loss"]))
        print(f"teacher step {step:3d}: loss {teacher_losses[-1]:.4f}  batch accuracy {float(metrics['accuracy']):.3f}")
    assert np.isfinite(teacher_losses).all(), teacher_losses
""")

md("""
    ### Student: `steps.distill_step` against the frozen teacher

    The teacher runs live on the same augmented crop as the student; its parameters are a
    separate argument (never differentiated, updated or donated). The loss is the soft KL between
    the two predictions plus an L2 distance between the last feature maps; no labels are used,
    so the pool holds the labelled tiles and the unlabelled slides' tiles.
""")

code("""
    teacher_params = teacher_state.params
    student_tx = make_optimizer(config.distill.optim, total_steps=config.distill.steps)
    student_state = parallel.put_replicated(
        create_train_state(init_params(model, rng=jax.random.key(config.seed + 1), input_px=train_spec.student_px),
                           tx=student_tx), mesh=mesh)
    distill_step = jax.jit(
        functools.partial(steps.distill_step, student=model, teacher=model, tx=student_tx,
                          loss=steps.DistillLoss(**config.distill.loss.to_dict())),
        in_shardings=(repl, repl, split), out_shardings=(repl, repl), donate_argnums=0)

    batches = loader(splits.pool, config.distill.batch_size, seed=config.seed + 1)
    student_losses = []
    for step in range(1, LOOP_STEPS + 1):
        batch = parallel.put_batch(next(batches), mesh=mesh)
        student_state, metrics = distill_step(student_state, teacher_params, batch)
        student_losses.append(float(metrics["loss"]))
        print(f"student step {step:3d}: loss {student_losses[-1]:.4f} (KL {float(metrics['kl']):.4f}, "
              f"feature {float(metrics['feature']):.4f})  agreement with the teacher {float(metrics['agreement']):.3f}")
    assert np.isfinite(student_losses).all(), student_losses
""")

md("""
    ### Evaluate both on the test tiles

    `evaluation.evaluate` jits `steps.eval_step` over the mesh and returns the labels and class
    probabilities of a whole split, in record order (a slide that fails to read is left out, never
    replaced). After so few steps the figures are near chance (1/3);
    the point here is the mechanics.
""")

code("""
    from histokd_jax import evaluation
    from histokd_jax.metrics import classification_metrics

    print(f"{'model':<12}{'input px':>9}{'accuracy':>10}{'balanced':>10}")
    for role, params, image_key, px in (("teacher", teacher_params, "teacher_image", train_spec.teacher_px),
                                        ("distill", student_state.params, "student_image", train_spec.student_px)):
        labels, probs = evaluation.evaluate(params, splits.test, model=model, image_key=image_key, spec=eval_spec,
                                            mesh=mesh, batch_size=config.train.eval_batch_size)
        m = classification_metrics(labels, probs)
        print(f"{role:<12}{px:>9}{m['accuracy']:>10.3f}{m['balanced_accuracy']:>10.3f}")
""")

md("""
    ## The one-call use: `experiment.train_and_report`

    The same as `python launch/train.py --config=configs/demo.py --workdir=...`: the teacher,
    the distilled student and a label-only baseline at the student's resolution, each
    validated, checkpointed (rerunning resumes or skips finished stages) and tested; then the
    evaluation report with bootstrap intervals, the resolution table and the student's heatmap
    of a test slide. The demo slides written above are reused.
""")

code("""
    from histokd_jax import experiment, trainer

    rows = experiment.train_and_report(config, workdir)
    assert rows is not None
""")

md("""
    ### Teacher / student table

    From `results.json`: test accuracy, balanced accuracy and macro-F1 of each model, its input
    size and its cost. Below it, `sweep.md`: the same models with 95% bootstrap intervals and
    the images/s measured on this runtime.
""")

code("""
    import json

    from IPython.display import Image, Markdown, display

    results = json.loads((workdir / "results.json").read_text())
    print(trainer.format_table(results))
    display(Markdown((workdir / "sweep.md").read_text()))
""")

md("""
    ### The distilled student's heatmap of a test slide

    Each tile coloured by the class the 2.5x student predicts (`predictions/` also holds the
    per-tile CSV and a QuPath GeoJSON). `python launch/predict.py --checkpoint=WORKDIR SLIDE...`
    maps any slide the same way.
""")

code("""
    heatmaps = sorted((workdir / "predictions").glob("*.heatmap.png"))
    if HEATMAP_SLIDES and not heatmaps:
        raise FileNotFoundError(f"no heatmap under {workdir / 'predictions'}")
    for path in heatmaps:
        print(path.name)
        display(Image(filename=str(path), width=480))
""")


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "accelerator": "TPU",  # Colab asks for a TPU runtime when it opens the notebook
        "colab": {"provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source, tags) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{i:02d}"
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        same = NOTEBOOK.exists() and NOTEBOOK.read_text() == text
        print(f"{NOTEBOOK} is {'up to date' if same else 'out of date: run python notebooks/make_colab_tpu.py'}")
        return 0 if same else 1
    NOTEBOOK.write_text(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
