"""Write docs/benchmark_tiles.png: tiles of the multi-scale benchmark as each magnification sees them.

    python docs/make_benchmark_tiles.py

One row per class; for each of four tiles, the 10x tile (128 px, 1 µm/px) and its block means at 5x,
2.5x and 1.25x (the students' views), shown at the same size. Nothing is trained or read: the tiles
are drawn by ``multiscale.render_tile`` from fixed seeds.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from histokd_jax.data import multiscale  # noqa: E402
from histokd_jax.data.views import area_downsample  # noqa: E402

FACTORS = ((1, "10x"), (2, "5x"), (4, "2.5x"), (8, "1.25x"))


def sheet(*, per_class: int = 3, tile_px: int = 128, seed: int = 0) -> Image.Image:
    label_w, head_h, pad, gap = 70, 30, 2, 10
    group = len(FACTORS) * (tile_px + pad) + gap
    out = Image.new("RGB", (label_w + per_class * group, head_h + len(multiscale.CLASS_NAMES) * (tile_px + pad)),
                    "white")
    draw = ImageDraw.Draw(out)
    for i in range(per_class):
        for j, (_, name) in enumerate(FACTORS):
            draw.text((label_w + i * group + j * (tile_px + pad) + 4, 8), name, fill="black")
    for k, cls in enumerate(multiscale.CLASS_NAMES):
        y = head_h + k * (tile_px + pad)
        draw.text((4, y + tile_px // 2 - 6), cls, fill="black")
        for i in range(per_class):
            tile = multiscale.render_tile(np.random.default_rng([seed, k, i]), k, tile_px=tile_px)
            for j, (f, _) in enumerate(FACTORS):
                view = Image.fromarray(area_downsample(tile, f)).resize((tile_px, tile_px), Image.NEAREST)
                out.paste(view, (label_w + i * group + j * (tile_px + pad), y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("benchmark_tiles.png")))
    args = parser.parse_args()
    sheet().save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
