"""The ``histokd`` command: ``histokd <command> [flags]``, one module per command in this package.

Each command defines absl flags at import, so only the chosen module is imported (two commands'
``--workdir`` would collide). ``launch/*.py`` run the same modules from a checkout.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

from absl import flags

from histokd_jax import configs

# command -> (module in this package, what it does); the order is the order of a project.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train the teacher, distil the student, train the baseline (resumes)"),
    "evaluate": ("evaluate", "the report of a finished workdir, recomputed from its checkpoints"),
    "sweep": ("sweep", "students over magnifications and pool sizes, with confidence intervals"),
    "predict": ("predict", "a trained model over whole slides: tile CSV, GeoJSON, heatmap, summary"),
    "export": ("export", "TorchScript + config.json for WSInfer, and ONNX (--onnx)"),
    "reproduce": ("reproduce", "the paper's experiments on the multi-scale benchmark"),
    "ablate": ("ablate", "ablations of the distilled student on the benchmark"),
    "import-torch": ("import_torch", "a teacher trained with the authors' PyTorch code, as a teacher folder"),
    "export-torch": ("export_torch", "a trained model as the authors' PyTorch state dict"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: histokd <command> [flags]   (histokd <command> --help lists its flags)\n\n" + "\n".join(lines)


def packaged_config(argv: list[str]) -> list[str]:
    """``--config=demo`` (or ``configs/demo.py`` outside a checkout) -> the config shipped in the package,
    so the README's commands work after a plain ``pip install``. A path that exists is left as it is."""
    shipped = pathlib.Path(configs.__file__).parent

    def resolve(value: str) -> str:
        path, sep, arg = value.partition(":")
        name = pathlib.Path(path).name.removesuffix(".py")
        if pathlib.Path(path).exists() or not (shipped / f"{name}.py").is_file():
            return value
        return str(shipped / f"{name}.py") + sep + arg

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def main(argv: list[str] | None = None) -> None:
    """``histokd``'s entry point (``[project.scripts]``)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        sys.exit(f"error: unknown command {argv[0]!r}\n\n{usage()}")
    run_command(argv[0], argv[1:], prog=f"histokd {argv[0]}")


def run_command(command: str, args: list[str], *, prog: str) -> None:
    """Import only ``command``'s module and run it on ``args`` (``prog`` names it in usage lines)."""
    module = importlib.import_module(f"histokd_jax.cli.{COMMANDS[command][0]}")
    if "-h" in args or "--help" in args:  # absl's --help lists only __main__'s flags: none of ours
        print(f"{prog}: {COMMANDS[command][1]}\n{module.__doc__}\n{flags.FLAGS.module_help(module.__name__)}")
        return
    sys.argv = [prog, *packaged_config(args)]  # absl's messages name sys.argv[0]
    module.run(sys.argv)
