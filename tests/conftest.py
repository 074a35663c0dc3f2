"""Shared test set-up.

- grain's worker processes read absl flags, which are only parsed under
  ``absl.app.run``; mark them parsed so loaders work inside pytest too.
- XLA compilation dominates the small training runs here (seconds per
  function on CPU); a persistent compilation cache, inherited by the
  subprocesses the end-to-end tests start, compiles each program once.
"""

import os
import pathlib
import tempfile

from absl import flags

CACHE = pathlib.Path(tempfile.gettempdir()) / "histokd_jax_test_xla_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))

import jax  # noqa: E402  (after the environment variable, which jax reads at import)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
flags.FLAGS.mark_as_parsed()
