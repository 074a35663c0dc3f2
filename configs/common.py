"""`--config=configs/common.py`: the config defined in `histokd_jax/configs/common.py`, which ships with the
package (`from histokd_jax.configs import common` works after a plain `pip install`, outside this checkout)."""

from histokd_jax.configs.common import get_config

__all__ = ["get_config"]
