"""`--config=configs/demo.py`: the config defined in `histokd_jax/configs/demo.py`, which ships with the
package (`from histokd_jax.configs import demo` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.demo import get_config

__all__ = ["get_config"]
