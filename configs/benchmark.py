"""`--config=configs/benchmark.py`: the config defined in `histokd_jax/configs/benchmark.py`, which ships with the
package (`from histokd_jax.configs import benchmark` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.benchmark import get_config

__all__ = ["get_config"]
