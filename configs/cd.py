"""`--config=configs/cd.py`: the config defined in `histokd_jax/configs/cd.py`, which ships with the
package (`from histokd_jax.configs import cd` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.cd import get_config

__all__ = ["get_config"]
