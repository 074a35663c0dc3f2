"""What every launcher sets up: quiet logs, a persistent compilation cache, and polite stops on signals."""

from __future__ import annotations

import os
import pathlib
import signal


def prepare_runtime() -> None:
    """Quiet orbax/jax INFO logs; reuse compiled programs across runs (a rerun after a preemption
    does not recompile for minutes)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log every checkpoint at INFO
    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache/histokd_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)


# Variables that mean "you are one of several processes" (a SLURM job step, an Open MPI launch, a multi-host
# Cloud TPU slice, or JAX's own); jax.distributed.initialize() reads the rest of the set-up from them.
# SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: the latter is also set in the batch script itself, outside `srun`.
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                     "TPU_WORKER_HOSTNAMES")


def _several(value: str | None) -> bool:
    return bool(value) and (value.count(",") > 0 if not value.strip().isdigit() else int(value) > 1)


def cluster_detected(environ=os.environ) -> bool:
    """Whether the environment describes a multi-process job (one variable saying there are several)."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(_several(environ.get(name)) for name in CLUSTER_VARIABLES[1:])


def init_distributed(*, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                     environ=os.environ) -> bool:
    """Join a multi-process run with ``jax.distributed.initialize`` when asked to or when a cluster is detected.

    Explicit values (``launch/train.py --coordinator_address=host:port --num_processes=N
    --process_id=i``, one command per host) win; otherwise JAX reads them from the
    cluster's variables. On CPU the collectives go over gloo. Returns whether it
    initialised; must run before anything touches a JAX device.
    """
    explicit = bool(coordinator_address) or num_processes > 1
    if not (explicit or cluster_detected(environ)):
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only if the devices are CPUs
    kwargs = {}
    if explicit:
        if not (coordinator_address and num_processes > 1 and 0 <= process_id < num_processes):
            raise ValueError(
                "a multi-process launch needs all of --coordinator_address=host:port, --num_processes=N (>1) and "
                f"--process_id in 0..N-1; got {coordinator_address!r}, {num_processes}, {process_id}")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    return True


class StopOnSignal:
    """Ctrl-C or SIGTERM (a preemption) -> finish the current step, save a checkpoint, exit.

    Pass it as ``should_stop``. A second Ctrl-C interrupts at once (losing the steps
    since the last checkpoint).
    """

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)", flush=True)

    def __call__(self, stage_name: str, step: int) -> bool:
        return self.requested
