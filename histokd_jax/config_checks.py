"""Refuse a bad configuration before any data is read, any model built or anything compiled.

A mistake in a config otherwise surfaces minutes later (after slide indexing or a
teacher's training), or never: a teacher of another architecture could be loaded
loosely, a misspelt key silently ignored. ``check_config`` runs every check up
front; each message names the config key, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags

from histokd_jax import checkpoint
from histokd_jax.configs import common
from histokd_jax.data.splits import resolve_downsample
from histokd_jax.data.views import ALLOWED_DOWNSAMPLES
from histokd_jax.models import COMPUTE_DTYPES, PADDINGS, check_groupnorm
from histokd_jax.stage_names import STAGE_NAMES, check_no_old_folders
from histokd_jax.symmetry import DIHEDRAL
from histokd_jax.units import MPP_AT_1X, resolution_to_mpp

SELECT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")

# What a teacher's parameters and their meaning depend on: a teacher loads only into the same values.
# (num_groups, padding and norm_epsilon leave every parameter shape unchanged: only this comparison catches them.)
TEACHER_MODEL_KEYS = ("widths", "blocks_per_stage", "num_groups", "padding", "norm_epsilon")


def check_config(config: ml_collections.ConfigDict, *, device_count: int, workdir: pathlib.Path | None = None,
                 reference: ml_collections.ConfigDict | None = None) -> None:
    """Every up-front check; raise the first problem found (``ValueError`` or ``FileNotFoundError``).

    ``device_count`` is the GLOBAL number of devices (``jax.device_count()`` after
    ``jax.distributed.initialize()``); ``workdir`` is where a teacher trained by an earlier
    run of the same command would be; ``reference`` is the config whose keys are the known
    ones (default: ``histokd_jax.configs.common.get_config()``).
    """
    check_known_keys(config, reference=reference)
    if workdir is not None:
        check_no_old_folders(workdir)
    check_stages(config.stages)
    check_training_settings(config)
    factor = check_resolution(config.data)
    check_groupnorm_sizes(config, teacher_px=config.data.teacher_px, student_px=config.data.teacher_px // factor)
    check_batch_sizes(config, device_count=device_count)
    check_teacher(config, workdir=workdir)


# --- keys -----------------------------------------------------------------------------------------


def flat_items(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """Every section and leaf by dotted name, in order: ``{"data": <section>, "data.kind": "slides", ...}``."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        out[name] = value
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flat_items(value, name + "."))
    return out


def flat_keys(config: ml_collections.ConfigDict | dict) -> list[str]:
    """Dotted names of every leaf and section: ``["data", "data.kind", ...]``."""
    return list(flat_items(config))


def flat_leaves(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """Dotted name -> value of every leaf (what two configs are compared by)."""
    return {name: value for name, value in flat_items(config).items()
            if not isinstance(value, (ml_collections.ConfigDict, dict))}


def closest_keys(name: str, known: Sequence[str], *, n: int = 3) -> list[str]:
    """Known dotted keys that look like ``name`` (difflib): whole-path matches, else by the last part."""
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.7)
    if close:
        return close
    parent, _, leaf = name.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    return [siblings[s] for s in difflib.get_close_matches(leaf, list(siblings), n=n, cutoff=0.5)]


def describe_unknown_key(name: str, known: Sequence[str]) -> str:
    """``data.tile_pxx`` -> "data.tile_pxx (closest known: data.tile_px, ...)"; with nothing close, the keys
    of its section. An unknown section is named itself: ``nonexist.foo`` -> "nonexist (...)"."""
    parts = name.split(".")
    name = next(p for p in (".".join(parts[: i + 1]) for i in range(len(parts))) if p not in known)
    close = closest_keys(name, known)
    if close:
        return f"{name} (closest known: {', '.join(close)})"
    parent = name.rpartition(".")[0]
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    return f"{name} (the keys of {parent or 'the config'} are {', '.join(siblings)})"


def _reference_config() -> ml_collections.ConfigDict:
    return common.get_config()


def check_known_keys(config: ml_collections.ConfigDict, *, reference: ml_collections.ConfigDict | None = None) -> None:
    """A key the defaults do not have is read by nothing: a typo in a config file would be ignored.

    (The command line is checked by ml_collections itself; see ``parse_flags``.)
    """
    reference = reference if reference is not None else _reference_config()
    known = set(flat_keys(reference))
    unknown = [k for k in flat_keys(config) if k not in known]
    unknown = [k for k in unknown if k.rpartition(".")[0] not in unknown]  # an unknown section once, not its keys
    if unknown:
        raise ValueError(f"unknown config key(s) {'; '.join(describe_unknown_key(k, sorted(known)) for k in unknown)}: "
                         "nothing reads them. Rename or remove them (histokd_jax/configs/common.py lists every "
                         "key with its default), or add a new key there")


def unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str], *, flag_name: str = "config") -> str | None:
    """The first ``--config.a.b=value`` of ``argv`` naming no key of ``config``, as a message; None if none does."""
    known = flat_keys(config)
    for arg in argv:
        prefix = f"--{flag_name}."
        if not arg.startswith(prefix):
            continue
        name = arg.removeprefix(prefix).split("=", 1)[0]
        if name not in known:
            return (f"{arg}: unknown config key {describe_unknown_key(name, known)}; "
                    "histokd_jax/configs/common.py lists every key with its default")
    return None


def parse_flags(argv: list[str], *, flag_name: str = "config") -> list[str]:
    """absl flag parsing for ``app.run(main, flags_parser=parse_flags)``: an override of a key the config does
    not have (``--config.data.nonexistent=1``) exits with one line naming it and the closest known keys,
    instead of ml_collections' traceback."""
    try:
        return app.parse_flags_with_usage(argv)  # absl's own errors: printed with the usage hint, exit 1
    except (AttributeError, KeyError) as err:  # what ml_collections raises for an override of an unknown key
        try:
            path = _config_file_argument(argv, flag_name)
            config = flags.FLAGS[flag_name].parser.parse(path) if path else None
            message = unknown_override(config, argv, flag_name=flag_name) if config is not None else None
        except Exception:  # noqa: BLE001 - the config file itself fails: fall back to ml_collections' words
            message = None
        sys.exit(f"FATAL Flags parsing error: {message or f'unknown config key {err}'}")


def _config_file_argument(argv: Sequence[str], flag_name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag_name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag_name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# --- stages and training settings ----------------------------------------------------------------


def check_stages(stages: Sequence[str]) -> None:
    """A misspelt stage would otherwise be a silent no-op."""
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"config.stages={tuple(stages)} has unknown names {unknown}; use names from "
                         f"{', '.join(STAGE_NAMES)}, e.g. --config.stages=\"('teacher', 'distill', 'baseline')\"")


def check_training_settings(config: ml_collections.ConfigDict) -> None:
    """Settings that would otherwise fail at the first evaluation or checkpoint, after minutes of training."""
    if config.train.select_metric not in SELECT_METRICS:
        raise ValueError(f"train.select_metric={config.train.select_metric!r} is not a metric; use one of "
                         f"{', '.join(SELECT_METRICS)}")
    for name in ("log_every_steps", "checkpoint_every_steps"):
        if config.train[name] <= 0:
            raise ValueError(f"train.{name}={config.train[name]} must be positive")
    for section in STAGE_NAMES:
        for name in ("steps", "eval_every_steps", "batch_size"):
            if config[section][name] <= 0:
                raise ValueError(f"{section}.{name}={config[section][name]} must be positive")
    check_model_options(config)


def check_model_options(config: ml_collections.ConfigDict) -> None:
    """Choices read only when a model is built or a step traced: after the teacher's training, for distill."""

    dtypes = tuple(COMPUTE_DTYPES)
    checks = [("model.compute_dtype", config.model.get("compute_dtype", "float32"), dtypes),
              ("model.padding", config.model.get("padding", "same"), PADDINGS),
              ("distill.teacher_dtype", config.distill.get("teacher_dtype", ""), ("", *dtypes))]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    views = config.distill.get("views_per_crop", 1)
    if not 1 <= views <= len(DIHEDRAL):
        raise ValueError(f"distill.views_per_crop={views} must be 1..{len(DIHEDRAL)}: a crop has "
                         f"{len(DIHEDRAL)} distinct flips and quarter turns")


# --- resolution ----------------------------------------------------------------------------------


def _mpp(data: ml_collections.ConfigDict, key: str) -> float:
    """µm/px of ``data.<key>``: ``"10x"`` -> 1.0 (mpp = 10 / power, a heuristic); ``"0.5"`` -> 0.5 µm/px."""

    try:
        return resolution_to_mpp(data[key])
    except ValueError as err:
        raise ValueError(f"data.{key}={data[key]!r}: {err}; write a magnification like '10x' or a µm/px number "
                         "like '1.0'") from None


def _resolution_like(value: str, mpp: float) -> str:
    """``mpp`` written as ``value`` is: a magnification (``'2.5x'``) or µm/px (``'4'``)."""
    return f"'{MPP_AT_1X / mpp:g}x'" if str(value).strip().lower().endswith("x") else f"'{mpp:g}'"


def check_resolution(data: ml_collections.ConfigDict) -> int:
    """The student downsample factor, once it is known to be usable.

    The student view is the block mean of factor x factor teacher pixels, so the factor must be
    a whole number that divides the teacher tile; it must be a power of two because scanner
    pyramids and objective magnifications are (40x, 20x, 10x, ... 1.25x), and whole-slide
    inference reads the student's resolution from those levels. A student at a HIGHER
    resolution than its teacher is the configuration turned around: nothing to distil.
    """

    allowed = ", ".join(map(str, ALLOWED_DOWNSAMPLES))
    if data.teacher_magnification and data.student_magnification:
        teacher, student = _mpp(data, "teacher_magnification"), _mpp(data, "student_magnification")
        names = (f"data.teacher_magnification={data.teacher_magnification!r} ({teacher:g} µm/px) -> "
                 f"data.student_magnification={data.student_magnification!r} ({student:g} µm/px)")
        options = ", ".join(_resolution_like(data.student_magnification, teacher * f) for f in ALLOWED_DOWNSAMPLES[1:])
        if student < teacher:
            raise ValueError(f"{names}: the student's resolution is higher than the teacher's; the student must see "
                             f"the tissue at a LOWER magnification (more µm/px), e.g. data.student_magnification "
                             f"one of {options}, or swap the two")
        ratio = student / teacher
        if not (math.isclose(ratio, round(ratio), rel_tol=1e-3) and round(ratio) in ALLOWED_DOWNSAMPLES):
            raise ValueError(f"{names}: a downsample of {ratio:.4g}, not a power of two in {allowed}; use "
                             f"data.student_magnification one of {options}")
    elif data.downsample and data.downsample < 1:
        raise ValueError(f"data.downsample={data.downsample} would give the student a higher resolution than the "
                         f"teacher; use a factor in {allowed} (the student's tile is teacher_px / downsample)")
    factor = resolve_downsample(data)
    if factor not in ALLOWED_DOWNSAMPLES:
        raise ValueError(f"data.downsample={factor} is not a power of two in {allowed}; use one of them (or "
                         "magnifications that differ by such a factor)")
    if data.teacher_px % factor:
        raise ValueError(f"data.teacher_px={data.teacher_px} is not divisible by the downsample {factor}: the student "
                         f"tile would not be whole; use data.teacher_px={_multiple(data.teacher_px, factor)}")
    if data.kind == "synthetic" and data.tile_px < data.teacher_px:
        raise ValueError(f"data.tile_px={data.tile_px} is smaller than data.teacher_px={data.teacher_px}: the teacher "
                         f"crop is cut from the generated tile; use data.tile_px >= {data.teacher_px}")
    return factor


def check_groupnorm_sizes(config: ml_collections.ConfigDict, *, teacher_px: int, student_px: int) -> None:
    """GroupNorm over too few values erases the features (see ``models.check_groupnorm``)."""

    m = config.model
    check_groupnorm(input_px=teacher_px, widths=m.widths, num_groups=m.num_groups, role="teacher")
    check_groupnorm(input_px=student_px, widths=m.widths, num_groups=m.num_groups, role="student")


# --- batches -------------------------------------------------------------------------------------


def check_batch_sizes(config: ml_collections.ConfigDict, *, device_count: int) -> None:
    """Every global batch is split evenly over all devices of all processes; check every stage at once
    (a bad distill.batch_size would otherwise surface after the teacher's whole training)."""
    problems = []
    for stage in config.stages:
        if stage == "teacher" and config.teacher.checkpoint:
            continue  # a given teacher is evaluated, not trained
        batch = config[stage].batch_size
        views = int(config[stage].get("views_per_crop", 1))  # distillation: student views per teacher crop
        if views > 1 and batch % views:
            problems.append(f"{stage}.batch_size={batch} is not a multiple of {stage}.views_per_crop={views} "
                            f"(use {_multiple(batch, views)})")
            continue
        crops = batch // views
        if crops % device_count:
            what = f"{stage}.batch_size={batch}" + (f" ({crops} crops of {views} views)" if views > 1 else "")
            problems.append(f"{what} does not divide evenly over {device_count} device(s) "
                            f"(use {_multiple(batch, device_count * views)})")
    eval_batch = config.train.eval_batch_size
    if eval_batch % device_count:
        problems.append(f"train.eval_batch_size={eval_batch} does not divide evenly over {device_count} device(s) "
                        f"(use {_multiple(eval_batch, device_count)})")
    if problems:
        raise ValueError("; ".join(problems) + ". Batch sizes are global: a multiple of jax.device_count(), the "
                                               "devices of all processes")


def _multiple(value: int, of: int) -> str:
    """The nearest multiples of ``of`` around ``value``: "16" or "8 or 16"."""
    low, high = value // of * of, -(-value // of) * of
    return " or ".join(str(v) for v in dict.fromkeys((low, high)) if v > 0)


# --- the teacher ---------------------------------------------------------------------------------


def teacher_dir(config: ml_collections.ConfigDict, *, workdir: pathlib.Path | None) -> pathlib.Path:
    """Where distillation takes its teacher from: ``teacher.checkpoint``, else this workdir's ``teacher/``."""
    if config.teacher.checkpoint:
        return pathlib.Path(config.teacher.checkpoint).expanduser()
    if workdir is None:
        raise ValueError("distillation needs a teacher: set teacher.checkpoint, or give the run's workdir")
    return workdir / "teacher"


def require_finished_teacher(config: ml_collections.ConfigDict, *, workdir: pathlib.Path | None) -> pathlib.Path:
    """The teacher folder, which must hold a finished teacher (``result.json``, written after its last step)."""
    folder = teacher_dir(config, workdir=workdir)
    if (folder / "result.json").exists():
        return folder
    state = "has not finished training (no result.json)" if folder.exists() else "does not exist"
    if config.teacher.checkpoint:
        raise FileNotFoundError(
            f"distillation needs a finished teacher: teacher.checkpoint={config.teacher.checkpoint} {state}; point "
            "it at the teacher/ folder of a finished run (it holds result.json), or set --config.teacher.checkpoint='' "
            "and add 'teacher' to config.stages to train one")
    raise FileNotFoundError(
        f"distillation needs a finished teacher: {folder} {state} and config.stages={tuple(config.stages)} does not "
        "train one; add 'teacher' to config.stages or set --config.teacher.checkpoint=/path/to/workdir/teacher")


def check_teacher(config: ml_collections.ConfigDict, *, workdir: pathlib.Path | None) -> None:
    """The teacher distillation will use exists, is finished, and was trained as this config describes.

    A teacher is never loaded loosely (the paper's code loaded with ``strict=False``: a
    silently random teacher). Parameter shapes are compared when it is loaded; here its
    saved config is compared first, which also catches what shapes cannot show
    (``model.num_groups``, the class order, the teacher's resolution).
    """
    if config.teacher.checkpoint:
        folder = require_finished_teacher(config, workdir=workdir)
    elif "distill" in config.stages and workdir is not None:
        folder = teacher_dir(config, workdir=workdir)
        if "teacher" not in config.stages:
            require_finished_teacher(config, workdir=workdir)
        elif not (folder / "result.json").exists():
            return  # trained by this run: it cannot differ
    else:
        return
    check_teacher_matches(config, folder)


def teacher_record(folder: pathlib.Path) -> tuple[dict, dict]:
    """(config the teacher's checkpoint was saved with, its run's run.json); either {} when absent."""

    saved = {}
    directory = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if directory.is_dir():
        with ocp.CheckpointManager(directory.absolute(), item_names=checkpoint.ITEMS) as manager:
            steps = checkpoint.complete_steps(manager)
            if steps:
                saved = checkpoint.load_config(manager, steps[-1])
    run_file = folder.parent / "run.json"  # the teacher's run records the data it was trained on
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    return saved, run


def check_teacher_matches(config: ml_collections.ConfigDict, folder: pathlib.Path, *,
                          class_names: Sequence[str] | None = None) -> None:
    """Name every setting in which the teacher at ``folder`` differs from ``config``.

    ``class_names``: the classes the data loader found (default: ``data.class_names`` when set).
    """

    saved, run = teacher_record(folder)
    differ = []
    saved_model = saved.get("model", {})
    for key in TEACHER_MODEL_KEYS:
        if key in saved_model and key in config.model and _norm(saved_model[key]) != _norm(config.model[key]):
            differ.append(f"model.{key}: {_show(saved_model[key])} there, {_show(config.model[key])} here")
    saved_data = saved.get("data", {})
    theirs = run.get("class_names") or saved_data.get("class_names") or None
    ours = class_names or tuple(config.data.class_names) or None
    if theirs and ours and list(theirs) != list(ours):
        differ.append(f"classes: {len(theirs)} {list(theirs)} there, {len(ours)} {list(ours)} here (data.class_names)")
    their_px = run.get("teacher_px") or saved_data.get("teacher_px")
    if their_px and their_px != config.data.teacher_px:
        differ.append(f"data.teacher_px: {their_px} there, {config.data.teacher_px} here")
    their_mag, our_mag = saved_data.get("teacher_magnification"), config.data.teacher_magnification
    if their_mag and our_mag and not math.isclose(resolution_to_mpp(their_mag), _mpp(config.data, "teacher_magnification"),
                                                  rel_tol=1e-3):
        differ.append(f"data.teacher_magnification: {their_mag!r} there, {our_mag!r} here")
    if differ:
        where = f"teacher.checkpoint={folder}" if config.teacher.checkpoint else f"the finished teacher in {folder}"
        raise ValueError(
            f"{where} does not match this config: {'; '.join(differ)}. A teacher loads only into the architecture, "
            "classes and resolution it was trained with: set those values (e.g. --config.model.widths=...) to the "
            "teacher's, or train a new teacher (another --workdir, or teacher.checkpoint='' with 'teacher' in stages)")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)
