"""Runs the stages a config names (teacher, distill, baseline), resumably, and reports a table.

Each stage lives in ``workdir/<stage name>/`` (``teacher/``, ``distill/``, ``baseline/``, ``control/``): orbax checkpoints (state, best params,
data iterator, metadata, config) and, once finished, ``result.json``. Running the
same command again resumes an interrupted stage from its latest checkpoint and
skips a finished one, so ``workdir`` is the unit of work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from histokd_jax import atomic, checkpoint, parallel, report, steps, teacher_targets
from histokd_jax.data.pipeline import make_train_loader
from histokd_jax.data.splits import DataSplits, load_splits, resolve_downsample, view_spec
from histokd_jax.evaluation import Evaluation, evaluate_split, make_eval_fn
from histokd_jax.config_checks import check_config, check_teacher_matches, flat_leaves, require_finished_teacher
from histokd_jax.metric_writer import MetricWriter
from histokd_jax.messages import say
from histokd_jax.metrics import classification_metrics
from histokd_jax.model_config import compute_dtype, gflops_per_image, make_model
from histokd_jax.optim import make_optimizer
from histokd_jax.state import TrainState, abstract_params, create_train_state, init_params

RESULT_KEYS = ("role", "input_px", "downsample", "split", "accuracy", "balanced_accuracy", "macro_f1", "gflops_per_image")


@dataclasses.dataclass
class Stage:
    """One model to train: what it sees, what it trains on, and how one step updates it."""

    name: str  # "teacher" | "distill" | "baseline" | "control": config section, folder and results row
    cfg: ml_collections.ConfigDict  # config.teacher / config.distill / config.baseline / config.control
    model: nn.Module
    image_key: str  # "teacher_image" or "student_image"
    input_px: int
    downsample: int
    train_source: Any  # a grain random-access source (tile folder or slide tiles)
    make_step: Callable[[Any], Callable]  # tx -> unjitted step(state, [teacher_params,] batch)
    seed: int
    teacher_params: Any = None  # distillation only: the frozen teacher, passed to every step
    teacher_fingerprint: str | None = None  # teacher_targets.fingerprint(teacher_params): checked on resume
    views_per_crop: int = 1  # distillation: student views per teacher crop (the loader batch is batch_size / this)
    # (source, mesh=, stage_dir=) -> source, called once training starts: e.g. attach cached teacher targets
    prepare_source: Callable[..., Any] | None = None


def _flush(pending: list[dict], *, stage: "Stage", last_step: int, ckpt_dir: pathlib.Path, latest_saved) -> dict:
    """Fetch the metrics of the steps since the last flush; stop on a non-finite loss or gradient.

    Runs before every checkpoint, so a state whose loss or gradient (hence update)
    was NaN or Inf is never saved.
    """
    values = parallel.to_host(pending)
    health = np.asarray([[v["loss"], v["grad_norm"]] for v in values])
    bad = np.flatnonzero(~np.isfinite(health).all(axis=1))
    if bad.size:
        step = last_step - len(values) + 1 + int(bad[0])
        kept = f"the last good checkpoint (step {latest_saved}) is kept in {ckpt_dir}" if latest_saved else (
            "no checkpoint had been saved yet")
        raise FloatingPointError(
            f"{stage.name}: the loss / gradient norm became {health[bad[0]].tolist()} at step {step}; training "
            f"stopped and {kept}. Rerun with a lower --config.{stage.name}.optim.learning_rate (the run resumes "
            "from that checkpoint), or check the input data."
        )
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def run_stage(
    stage: Stage,
    *,
    config: ml_collections.ConfigDict,
    splits: DataSplits,
    mesh,
    workdir: pathlib.Path,
    writer: MetricWriter,
    should_stop: Callable[[str, int], bool] | None = None,
) -> tuple[Any, dict] | None:
    """Train one stage (or reuse it when finished); returns (best params, test row), None if stopped.

    The steps, in order: reuse a finished stage; start (optimizer, state, checkpoints, the resume check);
    the loader; restore; compile the step; the training loop (NaN check, validation, saves); the test row."""
    stage_dir = workdir / stage.name
    if parallel.from_process_0((stage_dir / "result.json").exists()):  # decided once: all take the same branch
        return _reuse_finished(stage, stage_dir=stage_dir, mesh=mesh)
    started = time.perf_counter()
    run = _start(stage, config=config, mesh=mesh, stage_dir=stage_dir)
    try:
        run.iterator = iter(_train_loader(stage, config=config, mesh=mesh, stage_dir=stage_dir,
                                          per_process_batch=run.per_process_batch))
        if run.resume_step >= 0:
            restored = _restore(run.manager, run.resume_step, stage=stage, state=run.state, iterator=run.iterator,
                                mesh=mesh)
            run.state, run.best_params, run.best = restored["state"], restored["best"], restored["meta"]
            say(f"{stage.name}: resuming from step {int(run.state.step)} of {stage.cfg.steps}")
        writer.forget_after(stage.name, int(run.state.step))  # what an interrupted run logged after it is redone
        evaluate = _evaluator(stage, config=config, mesh=mesh)
        finished = _train_loop(stage, run, step_fn=_compile_step(stage, tx=run.tx, mesh=mesh), config=config,
                               mesh=mesh, evaluate=lambda params: evaluate(params, splits.val), writer=writer,
                               should_stop=should_stop)
    finally:
        run.manager.wait_until_finished()
        run.manager.close()
    if not finished:
        return None
    row = _test_row(stage, best_params=run.best_params, best=run.best, config=config, splits=splits,
                    evaluate=evaluate, stage_dir=stage_dir, save=writer.enabled)
    row["stage_seconds"] = round(time.perf_counter() - started, 1)  # since the last resume, compilation included
    if writer.enabled:
        atomic.write_json(stage_dir / "result.json", row)  # last: it marks the stage finished
    return run.best_params, row


@dataclasses.dataclass
class _Run:
    """A stage being trained: what the loop updates and what its checkpoints hold."""

    tx: Any
    state: TrainState
    manager: Any
    identity: dict
    resume_step: int  # -1: a fresh start
    per_process_batch: int  # crops per loader batch on this process
    best_params: Any
    best: dict
    iterator: Any = None


def _reuse_finished(stage: Stage, *, stage_dir: pathlib.Path, mesh) -> tuple[Any, dict]:
    say(f"{stage.name}: finished earlier, reusing {stage_dir}")
    like = abstract_params(stage.model, input_px=stage.input_px)
    best, _ = checkpoint.load_best_params(stage_dir, params_like=like, mesh=mesh)
    return best, json.loads(_shared_file(stage_dir / "result.json").read_text())


def _start(stage: Stage, *, config: ml_collections.ConfigDict, mesh, stage_dir: pathlib.Path) -> _Run:
    """Fresh parameters and optimizer state, the checkpoint manager, and (before any data is prepared or
    restored) the check that a checkpoint to resume was made with these settings, data and teacher."""
    params = init_params(stage.model, rng=jax.random.key(stage.seed), input_px=stage.input_px)
    # config_checks.check_batch_sizes has made sure the crops of a batch split evenly over the devices
    per_process_batch = parallel.check_batch_size(stage.cfg.batch_size // stage.views_per_crop, mesh=mesh,
                                                  what=f"{stage.name} crops per batch")
    parallel.check_batch_size(config.train.eval_batch_size, mesh=mesh, what="train.eval_batch_size")
    tx = make_optimizer(stage.cfg.optim, total_steps=stage.cfg.steps)
    state = parallel.put_replicated(create_train_state(params, tx=tx), mesh=mesh)
    manager = checkpoint.make_manager(stage_dir / "checkpoints", keep=config.train.keep_checkpoints)
    identity = stage_identity(stage)
    resume_step = parallel.from_process_0(-1 if manager.latest_step() is None else manager.latest_step())
    if resume_step >= 0:  # a refusal stops every process
        parallel.on_every_process(lambda: _check_resumable(manager, resume_step, stage=stage, config=config,
                                                           identity=identity), what="checking the checkpoint")
    return _Run(tx=tx, state=state, manager=manager, identity=identity, resume_step=resume_step,
                per_process_batch=per_process_batch, best_params=parallel.to_host(state.params), best={"metric": -math.inf, "step": 0})


def _train_loader(stage: Stage, *, config: ml_collections.ConfigDict, mesh, stage_dir: pathlib.Path,
                  per_process_batch: int):
    source = (stage.prepare_source(stage.train_source, mesh=mesh, stage_dir=stage_dir) if stage.prepare_source
              else stage.train_source)
    return make_train_loader(source, spec=_train_spec(config, stage=stage), batch_size=per_process_batch,
                             seed=stage.seed, workers=config.data.workers)


def _compile_step(stage: Stage, *, tx, mesh) -> Callable:
    """The stage's step under jit: state and teacher replicated, the batch sharded over the devices."""
    replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    frozen = () if stage.teacher_params is None else (stage.teacher_params,)  # distillation: the teacher
    step_fn = jax.jit(stage.make_step(tx), in_shardings=(replicated, *(replicated for _ in frozen), batch_sharded),
                      out_shardings=(replicated, replicated), donate_argnums=(0,))
    return lambda state, batch: step_fn(state, *frozen, batch)


def _evaluator(stage: Stage, *, config: ml_collections.ConfigDict, mesh) -> Callable:
    """(params, source) -> Evaluation: the stage's model over a split's un-augmented tiles."""
    return functools.partial(evaluate_split, model=stage.model, image_key=stage.image_key,
                             spec=view_spec(config.data, train=False), mesh=mesh,
                             batch_size=config.train.eval_batch_size,
                             eval_fn=make_eval_fn(model=stage.model, image_key=stage.image_key, mesh=mesh))


def _train_loop(stage: Stage, run: _Run, *, step_fn: Callable, config: ml_collections.ConfigDict, mesh,
                evaluate: Callable, writer: MetricWriter, should_stop: Callable[[str, int], bool] | None) -> bool:
    """Steps from the state's step to the last: metrics fetched (and NaN-checked) at log, eval and save steps,
    validation picks the best parameters, checkpoints at save steps and on a stop. False when stopped."""
    cfg, train = stage.cfg, config.train
    first = int(run.state.step)
    bar = tqdm(total=cfg.steps, initial=first, desc=stage.name, unit="step", mininterval=0.5,
               disable=not (train.progress and writer.enabled))
    pending: list[dict] = []
    try:
        for step in range(first + 1, cfg.steps + 1):
            run.state, metrics = step_fn(run.state, parallel.put_batch(next(run.iterator), mesh=mesh))
            pending.append(metrics)
            bar.update()
            eval_now = step % cfg.eval_every_steps == 0 or step == cfg.steps
            save_now = eval_now or step % train.checkpoint_every_steps == 0
            stop_now = bool(should_stop and should_stop(stage.name, step))
            if jax.process_count() > 1:  # processes agree at log and save steps only: no sync on every step
                at_boundary = step % train.log_every_steps == 0 or save_now
                stop_now = at_boundary and parallel.any_process(stop_now)
            if not (step % train.log_every_steps == 0 or save_now or stop_now):
                continue
            means = _flush(pending, stage=stage, last_step=step, ckpt_dir=run.manager.directory,
                           latest_saved=run.manager.latest_step())
            pending = []
            writer.write(f"{stage.name}/train", step, means)
            bar.set_postfix(loss=f"{means['loss']:.4f}")
            if eval_now:
                _validate(stage, run, step=step, evaluate=evaluate, writer=writer, select=train.select_metric)
            if save_now or stop_now:
                checkpoint.save(run.manager, step, state=run.state, best_params=run.best_params,
                                data_iterator=run.iterator, meta=run.best, config_json=config.to_json(),
                                identity=run.identity)
            if stop_now:
                say(f"{stage.name}: stopped at step {step}; run the same command again to resume")
                return False
    finally:
        bar.close()
    return True


def _validate(stage: Stage, run: _Run, *, step: int, evaluate: Callable, writer: MetricWriter, select: str) -> None:
    scored = evaluate(run.state.params)
    val = classification_metrics(scored.labels, scored.probs)
    writer.write(f"{stage.name}/val", step, val)
    if val[select] > run.best["metric"]:
        run.best = {"metric": val[select], "step": step, **val}
        run.best_params = parallel.to_host(run.state.params)


def _test_row(stage: Stage, *, best_params, best: dict, config: ml_collections.ConfigDict, splits: DataSplits,
              evaluate: Callable, stage_dir: pathlib.Path, save: bool) -> dict:
    """The best parameters on the test split (and, for a student on slides, on the pyramid's own level);
    with ``save``, their predictions written before result.json marks the stage finished."""
    test = evaluate(best_params, splits.test)
    row = {**result_row(stage, labels=test.labels, probs=test.probs), **test.counts()}
    pyramid = _pyramid_test(stage, config=config, splits=splits, evaluate=lambda src: evaluate(best_params, src))
    if pyramid is not None:
        row["pyramid_accuracy"] = classification_metrics(pyramid.labels, pyramid.probs)["accuracy"]
    row.update(best_val_step=best["step"], best_val_metric=best["metric"])
    if save:
        save_test_predictions(stage_dir, scored=test, splits=splits)
        if pyramid is not None:
            save_test_predictions(stage_dir, scored=pyramid, splits=splits, filename=report.PYRAMID_PREDICTIONS)
    return row


def _shared_file(path: pathlib.Path) -> pathlib.Path:
    """``path``, which process 0 has seen: a clear error where this process cannot (no shared filesystem)."""
    if not path.exists():
        raise FileNotFoundError(f"process {jax.process_index()} cannot see {path}, which process 0 sees: the "
                                "workdir must be on a filesystem that every process shares")
    return path


def stage_identity(stage: Stage) -> dict:
    """What a stage's result depends on beyond its config, saved in each checkpoint and compared on resume:
    the training records (``repr`` of the source names them by content) and the frozen teacher."""
    return {"data": repr(stage.train_source), "teacher": stage.teacher_fingerprint}


def _restore(manager, step: int, *, stage: Stage, state, iterator, mesh) -> dict:
    try:
        return checkpoint.restore(manager, step, state_like=state, data_iterator=iterator, mesh=mesh)
    except ValueError as err:  # grain's own check of the loader (sampler, source, workers), for older checkpoints
        if "does not match" not in str(err):
            raise
        raise ValueError(f"{stage.name}: cannot resume from {manager.directory} (step {step}): "
                         f"{str(err).splitlines()[0]} Rerun with the data and settings of that run, or use a new "
                         "--workdir.") from err


def save_test_predictions(stage_dir: pathlib.Path, *, scored: Evaluation, splits: DataSplits,
                          filename: str = report.PREDICTIONS) -> None:
    """The final model's test predictions, for launch/evaluate.py: the scored tiles only, each with its
    slide (if any), and the slides dropped from the evaluation with their reasons."""
    report.save_predictions(stage_dir, labels=scored.labels, probs=scored.probs, class_names=splits.class_names,
                            slides=scored.slides, dropped=scored.dropped, filename=filename)


def _train_spec(config: ml_collections.ConfigDict, *, stage: Stage):
    """The stage's training views; the teacher's skip the scanner-like student views it never sees (its
    own views, drawn first from each record's random stream, are the same either way)."""
    spec = view_spec(config.data, train=True)
    return dataclasses.replace(spec, scanlike=0.0) if stage.image_key == "teacher_image" else spec


def _pyramid_test(stage: Stage, *, config: ml_collections.ConfigDict, splits: DataSplits,
                  evaluate: Callable) -> Evaluation | None:
    """A student's test split read from each slide's pyramid at its own µm/px (slide data only): the
    view whole-slide inference gives it, beside the block mean it was trained on."""
    factor = resolve_downsample(config.data)
    if stage.image_key != "student_image" or factor == 1 or not hasattr(splits.test, "reading_student_at"):
        return None
    return evaluate(splits.test.reading_student_at(splits.test.teacher_mpp * factor))


# Fields that may change between an interrupted run and its resumption without changing the result.
# The data's own identity (its records) is compared instead of where it lies.
RESUME_FREE_FIELDS = ("data.root", "data.manifest", "data.tfds_data_dir", "data.slide_index_dir", "teacher.checkpoint",
                      "train.progress", "stages")


def _check_resumable(manager, step: int, *, stage: Stage, config: ml_collections.ConfigDict, identity: dict) -> None:
    """Refuse to resume a stage whose checkpoint was made with other settings, data or teacher.

    Mixing two configs in one training run (another learning rate, batch size,
    model, resolution, worker count or selection metric), two datasets or two
    teachers would give a model that neither run describes; name what changed
    instead, so the user reruns with the old values or starts a new workdir.
    """
    saved = flat_leaves(checkpoint.load_config(manager, step))
    current = flat_leaves(json.loads(config.to_json()))
    relevant = ("seed", "model.", "data.", f"{stage.name}.", "train.select_metric")
    # Fields that only one side has were added or removed by an upgrade of this package: not compared.
    differ = sorted(
        k for k in set(saved) & set(current)
        if k.startswith(relevant) and k not in RESUME_FREE_FIELDS and saved[k] != current[k]
    )
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:8])
        raise ValueError(
            f"{stage.name}: the checkpoint in {manager.directory} was made with other settings ({shown}). "
            "Rerun with the old values to resume, or use a new --workdir."
        )
    # the settings first: a changed data.* setting is named as such rather than as changed records
    _check_same_identity(checkpoint.load_identity(manager, step), identity, stage=stage, where=manager.directory)


def _check_same_identity(saved: dict | None, current: dict, *, stage: Stage, where) -> None:
    if saved is None:  # a checkpoint from before identities were saved: grain's own check of the source refuses it
        return
    what = {"data": "the training data changed (other records, labels or order)",
            "teacher": "the teacher changed (its parameters differ; teacher.checkpoint or the workdir's teacher)"}
    for key, meaning in what.items():
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"{stage.name}: cannot resume from {where}: {meaning} since that checkpoint was saved "
                f"({saved.get(key)} -> {current.get(key)}). Rerun with the same {key} to resume exactly, or use a "
                "new --workdir.")


def result_row(stage: Stage, *, labels: np.ndarray, probs: np.ndarray) -> dict:
    return {
        "role": stage.name,
        "input_px": stage.input_px,
        "downsample": stage.downsample,
        "split": "test",
        **classification_metrics(labels, probs),
        "gflops_per_image": gflops_per_image(stage.model, input_px=stage.input_px),
    }


def format_table(rows: list[dict]) -> str:
    """The results as an aligned text table, plus the teacher/student FLOP ratio."""
    header = f"{'role':<18}{'input_px':>9}{'down':>6}{'accuracy':>10}{'bal_acc':>9}{'macro_f1':>10}{'GFLOPs':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['role']:<18}{r['input_px']:>9}{r['downsample']:>6}{r['accuracy']:>10.3f}"
            f"{r['balanced_accuracy']:>9.3f}{r['macro_f1']:>10.3f}{r['gflops_per_image']:>10.4f}"
        )
    by_role = {r["role"]: r for r in rows}
    if "teacher" in by_role and "distill" in by_role:
        ratio = by_role["teacher"]["gflops_per_image"] / by_role["distill"]["gflops_per_image"]
        lines.append(f"teacher / student FLOPs: {ratio:.1f}x")
    return "\n".join(lines)


def build_stage(name: str, *, config: ml_collections.ConfigDict, model: nn.Module, splits: DataSplits,
                teacher_params: Any = None) -> Stage:
    """The ``Stage`` for a config stage name: ``"teacher"``, ``"distill"``, ``"baseline"`` or ``"control"``."""
    spec = view_spec(config.data, train=True)
    if name == "teacher":
        return Stage(
            name="teacher", cfg=config.teacher, model=model, image_key="teacher_image", input_px=spec.teacher_px,
            downsample=1, train_source=splits.train, seed=config.seed,
            make_step=lambda tx: functools.partial(steps.supervised_step, model=model, tx=tx, image_key="teacher_image"),
        )
    if name == "distill":
        d = config.distill
        loss = steps.DistillLoss(**d.loss.to_dict())
        teacher = model.clone(dtype=compute_dtype(d.teacher_dtype)) if d.get("teacher_dtype") else model
        signature, cache = teacher_targets.fingerprint(teacher_params), None
        if d.get("target_cache"):
            cache = functools.partial(_cache_targets, teacher_params=teacher_params, teacher=teacher, config=config,
                                      signature=signature)
        return Stage(
            name="distill", cfg=d, model=model, image_key="student_image", input_px=spec.student_px,
            downsample=spec.downsample, train_source=splits.pool,
            seed=config.seed + 1, teacher_params=teacher_params, teacher_fingerprint=signature,
            views_per_crop=d.get("views_per_crop", 1),
            prepare_source=cache,
            make_step=lambda tx: functools.partial(steps.distill_step, student=model, teacher=teacher, tx=tx, loss=loss,
                                                   views_per_crop=d.get("views_per_crop", 1)),
        )
    if name == "control":  # the ceiling: the student trained on the whole pool with its true labels
        if splits.pool_truth is None:
            raise ValueError("the 'control' stage needs true labels for the whole pool; only the synthetic demo "
                             "data (data.kind 'synthetic' or 'synthetic_slides') has them")
        return Stage(
            name="control", cfg=config.control, model=model, image_key="student_image",
            input_px=spec.student_px, downsample=spec.downsample, train_source=splits.pool_truth, seed=config.seed + 1,
            make_step=lambda tx: functools.partial(steps.supervised_step, model=model, tx=tx, image_key="student_image"),
        )
    # The baseline starts from the distilled student's initialisation (same seed): only the objective
    # and the labels differ.
    return Stage(
        name="baseline", cfg=config.baseline, model=model, image_key="student_image",
        input_px=spec.student_px, downsample=spec.downsample, train_source=splits.train, seed=config.seed + 1,
        make_step=lambda tx: functools.partial(steps.supervised_step, model=model, tx=tx, image_key="student_image"),
    )


def _cache_targets(source, *, teacher_params, teacher, config, signature: str, mesh,
                   stage_dir: pathlib.Path) -> teacher_targets.CachedTargetSource:
    """``distill.target_cache``: one teacher pass over the pool before the student's first step, saved in
    ``stage_dir/teacher_targets`` and reused when the stage resumes with the same teacher, teacher precision,
    teacher input size and records (``teacher_targets.cache_key``)."""
    folder = stage_dir / "teacher_targets"
    key = teacher_targets.cache_key(source, teacher=signature, teacher_px=config.data.teacher_px,
                                    teacher_dtype=config.distill.get("teacher_dtype") or config.model.compute_dtype)
    if parallel.from_process_0(teacher_targets.saved_targets_match(folder, key=key)):  # decided once
        say(f"teacher targets: reusing {folder}")
        return teacher_targets.CachedTargetSource(source, folder=folder)
    started = time.perf_counter()
    logits, maps = teacher_targets.compute_targets(  # every process takes part: the mesh spans them all
        teacher_params, source, teacher=teacher, spec=view_spec(config.data, train=False),
        mesh=mesh, batch_size=config.train.eval_batch_size, show_progress=config.train.progress)
    if jax.process_index() == 0:
        teacher_targets.save_targets(folder, logits=logits, maps=maps, key=key)
    parallel.any_process(False)  # a barrier: the files are complete before any process maps them
    say(f"teacher targets cached for {len(source)} pool crops in {time.perf_counter() - started:.1f} s "
        f"({maps.nbytes / 2**20:.0f} MiB of feature maps in {folder})")
    return teacher_targets.CachedTargetSource(source, folder=folder)


def _teacher_params(config, *, model, input_px, mesh, workdir, class_names) -> Any:
    """The frozen teacher for distillation: ``teacher.checkpoint`` or this workdir's finished teacher.

    Its saved config must match this one (architecture, the classes the data have, resolution), then
    every parameter must load with its shape: never a loosely loaded, partly random teacher.
    """
    source = require_finished_teacher(config, workdir=workdir)
    check_teacher_matches(config, source, class_names=class_names)
    params, _ = checkpoint.load_best_params(source, params_like=abstract_params(model, input_px=input_px), mesh=mesh)
    return params


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    should_stop: Callable[[str, int], bool] | None = None,
    config_name: str = "this config",
) -> list[dict] | None:
    """Run every stage in ``config.stages``; write and print ``workdir/results.json``. The end-of-run
    report (``train.final_report``) is ``experiment.train_and_report``'s, above this module.

    ``should_stop(stage_name, step)`` lets a caller (a preemption handler, a test) stop
    after a step with a checkpoint saved; the function then returns None.
    """
    workdir = pathlib.Path(workdir).absolute()
    # before any data, model or compile; every process checks (the teacher's checkpoint is read through orbax,
    # whose restores wait for all processes) and a refusal on any stops all
    parallel.on_every_process(lambda: check_config(config, device_count=jax.device_count(), workdir=workdir),
                              what="checking the config")
    workdir.mkdir(parents=True, exist_ok=True)
    splits = parallel.process_0_first(lambda: load_splits(config.data, workdir=workdir, config_name=config_name))
    train_spec = view_spec(config.data, train=True)
    teacher_px, student_px = train_spec.teacher_px, train_spec.student_px
    model = make_model(config, num_classes=len(splits.class_names))
    mesh = parallel.make_mesh()
    writer = MetricWriter(workdir)
    if writer.enabled:
        atomic.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
        atomic.write_json(workdir / "run.json", _run_metadata(splits, mesh, teacher_px, student_px))

    rows, teacher_params = [], None
    try:
        for name in config.stages:
            if name == "teacher" and config.teacher.checkpoint:  # a given teacher: evaluate, don't train
                teacher_params = _teacher_params(config, model=model, input_px=teacher_px, mesh=mesh, workdir=workdir,
                                                 class_names=splits.class_names)
                stage = build_stage("teacher", config=config, model=model, splits=splits)
                test = evaluate_split(teacher_params, splits.test, model=model, image_key=stage.image_key,
                                      spec=view_spec(config.data, train=False), mesh=mesh,
                                      batch_size=config.train.eval_batch_size)
                rows.append({**result_row(stage, labels=test.labels, probs=test.probs), **test.counts()})
                if writer.enabled and not (workdir / "teacher" / "checkpoints").exists():
                    save_test_predictions(workdir / "teacher", scored=test, splits=splits)
                continue
            if name == "distill" and teacher_params is None:
                teacher_params = _teacher_params(config, model=model, input_px=teacher_px, mesh=mesh, workdir=workdir,
                                                 class_names=splits.class_names)
            stage = build_stage(name, config=config, model=model, splits=splits,
                                teacher_params=parallel.put_replicated(teacher_params, mesh=mesh)
                                if name == "distill" else None)
            out = run_stage(stage, config=config, splits=splits, mesh=mesh, workdir=workdir, writer=writer,
                            should_stop=should_stop)
            if out is None:
                return None
            params, row = out
            if name == "teacher":
                teacher_params = params
            rows.append(row)
    finally:
        writer.close()
    if writer.enabled:
        atomic.write_json(workdir / "results.json", rows)
    print(format_table(rows), flush=True)
    return rows


def _run_metadata(splits: DataSplits, mesh, teacher_px: int, student_px: int) -> dict:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": mesh.size,
        "processes": jax.process_count(),
        "data_root": str(splits.root),
        "class_names": list(splits.class_names),
        "records": splits.counts,
        "teacher_px": teacher_px,
        "student_px": student_px,
    }
