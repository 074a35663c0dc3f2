"""Write docs/demo_heatmaps.png: the teacher's and the distilled student's heatmaps of one mixed demo slide.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo
    python docs/make_demo_heatmaps.py --workdir=/tmp/histokd-demo [--slide slides/slides/slide_0069.tiff]
    python docs/make_demo_heatmaps.py --workdir=/tmp/histokd-reproduce/seed0 --student_workdir=/tmp/histokd-reproduce/seed0/f4

Each model runs ``inference.predict_slides`` (what launch/predict.py does) over the slide; the two
heatmaps are set side by side under a title each.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw  # noqa: E402

from histokd_jax import inference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished demo run")
    parser.add_argument("--slide", default="slides/slides/slide_0069.tiff", help="relative to the workdir")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("demo_heatmaps.png")))
    parser.add_argument("--width", type=int, default=780, help="width of the figure in pixels")
    parser.add_argument("--student_workdir", default="",
                        help="where the distilled student is, if not in --workdir (e.g. a reproduction's seed0/f4)")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    slide = workdir / args.slide
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("teacher", "student"):
            where = pathlib.Path(args.student_workdir) if model == "student" and args.student_workdir else workdir
            predictor = inference.load_predictor(where, model=model)
            summaries, skipped = inference.predict_slides([(slide, None, None)], predictor=predictor,
                                                          out_dir=pathlib.Path(tmp) / model, show_progress=False)
            if skipped:
                sys.exit(f"error: {skipped[0][0]}: {skipped[0][1]}")
            heatmap = Image.open(pathlib.Path(tmp) / model / f"{summaries[0]['name']}.heatmap.png").convert("RGB")
            title = (f"{'teacher' if model == 'teacher' else 'distilled student'}, {predictor.input_px} px at "
                     f"{10 / predictor.input_mpp:g}x")
            panel = Image.new("RGB", (heatmap.width, heatmap.height + 40), "white")
            panel.paste(heatmap, (0, 40))
            ImageDraw.Draw(panel).text((6, 6), title, fill="black", font_size=26)
            panels.append(panel)
    gap = 10
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap, max(p.height for p in panels)), "white")
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + gap, 0))
    canvas = canvas.resize((args.width, round(canvas.height * args.width / canvas.width)), Image.Resampling.LANCZOS)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
