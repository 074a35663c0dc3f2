"""Tiles per second of the slide tile source, teacher view alone and with a pyramid student view.

    python benchmarks/slide_source.py [--slides 12] [--tiles 2000]

Writes a synthetic slide set to a temporary folder, indexes it, then times
``SlideTileSource[i]`` over shuffled indices in one process (the work a grain
worker does per record). Both figures come from the same run.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from histokd_jax.data import manifest, slide_index, synthetic_slides
from histokd_jax.data.synthetic import CLASS_NAMES


def tiles_per_second(source, indices) -> float:
    source[int(indices[0])]  # open the slide handles outside the timing
    start = time.perf_counter()
    for i in indices:
        source[int(i)]
    return len(indices) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4, help="slides per class")
    parser.add_argument("--slide-tiles", type=int, default=16, help="slide side in 64 px tiles")
    parser.add_argument("--tiles", type=int, default=2000, help="tiles to read per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        path = synthetic_slides.write_slide_set(root / "set", seed=0, n_per_class=args.slides, n_unlabeled=0,
                                                tile_grid=(args.slide_tiles, args.slide_tiles))
        entries = manifest.read_manifest(path, class_names=CLASS_NAMES)
        settings = slide_index.IndexSettings(teacher_mpp=1.0, tile_px=64)
        start = time.perf_counter()
        usable, _ = slide_index.index_slides(entries, settings=settings, cache_dir=root / "index", show_progress=False)
        index_s = time.perf_counter() - start
        n_tiles = sum(len(t.coords) for t in usable)
        indices = np.random.default_rng(0).integers(0, n_tiles, args.tiles)
        print(f"{len(usable)} slides ({args.slide_tiles * 64} px square, 1 µm/px, JPEG tiles), {n_tiles} tissue tiles;"
              f" indexing {index_s / len(usable) * 1e3:.0f} ms/slide")
        for student_mpp, what in ((None, "teacher 64 px @ 10x only"), (4.0, "+ student 16 px @ 2.5x from pyramid"),
                                  (8.0, "+ student 8 px @ 1.25x from pyramid")):
            source = slide_index.SlideTileSource(usable, class_names=CLASS_NAMES, teacher_mpp=1.0, tile_px=64,
                                                 student_mpp=student_mpp)
            print(f"{what:<40s} {tiles_per_second(source, indices):8.0f} tiles/s")
            source.close()

        # The real SVS fixture: one pyramid level, so every read area-resizes level 0 (0.499 µm/px).
        real = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "cmu_small_region.svs"
        entry = manifest.SlideEntry(path=real, label=None, split="train", mpp=None, line=0)
        usable, _ = slide_index.index_slides([entry], settings=settings, cache_dir=root / "index", show_progress=False)
        indices = np.random.default_rng(0).integers(0, len(usable[0].coords), args.tiles)
        print(f"real SVS fixture: {len(usable[0].coords)} tissue tiles at 10x")
        for student_mpp, what in ((None, "teacher 64 px @ 10x only"), (8.0, "+ student 8 px @ 1.25x from level 0")):
            source = slide_index.SlideTileSource(usable, class_names=CLASS_NAMES, teacher_mpp=1.0, tile_px=64,
                                                 student_mpp=student_mpp)
            print(f"{what:<40s} {tiles_per_second(source, indices):8.0f} tiles/s")
            source.close()


if __name__ == "__main__":
    main()
