"""`--config=configs/crc.py`: the config defined in `histokd_jax/configs/crc.py`, which ships with the
package (`from histokd_jax.configs import crc` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.crc import get_config

__all__ = ["get_config"]
