"""`--config=configs/pcam.py`: the config defined in `histokd_jax/configs/pcam.py`, which ships with the
package (`from histokd_jax.configs import pcam` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.pcam import get_config

__all__ = ["get_config"]
