"""`--config=configs/demo_tiles.py`: the config defined in `histokd_jax/configs/demo_tiles.py`, which ships with the
package (`from histokd_jax.configs import demo_tiles` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.demo_tiles import get_config

__all__ = ["get_config"]
