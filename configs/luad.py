"""`--config=configs/luad.py`: the config defined in `histokd_jax/configs/luad.py`, which ships with the
package (`from histokd_jax.configs import luad` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.luad import get_config

__all__ = ["get_config"]
