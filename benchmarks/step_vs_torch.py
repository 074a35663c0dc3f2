"""Distillation step and inference: this project (Flax/XLA) against PyTorch on the same machine.

    python benchmarks/step_vs_torch.py [--rounds 7] [--factors 2 4 8] [--batch 32] [--skip_inference]

The paper model (widths 32-256, 32 GroupNorm groups), a 256 px teacher and students
at 256/f px, batch 32, AdamW. PyTorch runs the equivalent model and step defined in
``benchmarks/torch_reference.py`` (NCHW and channels_last), loaded with the same
weights; outputs are checked equal before anything is timed. Each round times one
step of every implementation back to back (interleaved, so machine noise hits all
alike); we report medians and the median of the per-round ratios. The machine's
float32 matmul peak is measured in the same run, and achieved GFLOP/s use analytic
FLOPs (2 x multiply-adds; a training step counts the teacher forward plus 3x the
student forward for forward + backward).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from histokd_jax.configs import common  # noqa: E402
from histokd_jax import models, optim, state, steps  # noqa: E402
from histokd_jax.data.views import area_downsample  # noqa: E402

WIDTHS = (32, 64, 128, 256)


def forward_flops(input_px: int) -> float:
    return models.forward_flops(input_px=input_px, widths=WIDTHS)


CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_description() -> str:
    """The CPU model and the vector / matrix features that decide which lowerings win (/proc/cpuinfo)."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or "unknown CPU"
    first = info.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    have = [f for f in CPU_FEATURES if f in flags]
    return (f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}), {info.count('processor')} logical CPUs; {' '.join(have) or 'no AVX2'}")


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """float32 GFLOP/s of a jitted n x n matmul (median)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e9


def flax_step(factor: int, batch: int, teacher_px: int = 256, model_kwargs: dict | None = None):
    """(jitted step, state, teacher params, batch) for the distillation step at ``factor``."""
    model = models.ResNetGN(num_classes=3, widths=WIDTHS, **(model_kwargs or {}))
    student_px = teacher_px // factor
    teacher_params = state.init_params(model, rng=jax.random.key(0), input_px=teacher_px)
    student_params = state.init_params(model, rng=jax.random.key(1), input_px=student_px)
    tx = optim.make_optimizer(common.get_config().distill.optim, total_steps=10_000)
    train_state = state.create_train_state(student_params, tx=tx)
    rng = np.random.default_rng(0)
    teacher_images = rng.integers(0, 256, (batch, teacher_px, teacher_px, 3), dtype=np.uint8)
    data = {"teacher_image": teacher_images,
            "student_image": np.stack([np.rint(area_downsample(im.astype(np.float32), factor)).astype(np.uint8)
                                       for im in teacher_images]),
            "label": np.zeros(batch, np.int32), "has_label": np.zeros(batch, bool)}
    step = jax.jit(functools.partial(steps.distill_step, student=model, teacher=model, tx=tx,
                                     loss=steps.DistillLoss()), donate_argnums=0)
    return step, train_state, teacher_params, {k: jnp.asarray(v) for k, v in data.items()}, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()
    import torch

    import torch_reference as ref

    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"CPU: {cpu_description()}", flush=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); float32 matmul peak {peak:.0f} GFLOP/s", flush=True)
    print(f"distillation step, teacher 256 px, batch {args.batch}, {args.rounds} interleaved rounds (ms, median)")
    print(f"{'f':>3}{'student px':>11}{'flax':>9}{'torch':>9}{'torch CL':>10}{'flax/torch':>12}{'flax/CL':>9}"
          f"{'flax GFLOP/s':>14}{'% peak':>8}")
    for factor in args.factors:
        step, st, tp, batch, model = flax_step(factor, args.batch)
        t0 = time.perf_counter()
        st, metrics = step(st, tp, batch)
        jax.block_until_ready(metrics["loss"])
        compile_s = time.perf_counter() - t0
        teacher = ref.load_flax_params(ref.TorchResNetGN(3), jax.device_get(tp))
        student = ref.load_flax_params(ref.TorchResNetGN(3), jax.device_get(st.params))
        teacher_cl = ref.load_flax_params(ref.TorchResNetGN(3), jax.device_get(tp))
        student_cl = ref.load_flax_params(ref.TorchResNetGN(3), jax.device_get(st.params))
        # same outputs before timing anything
        with torch.no_grad():
            t_logits, _ = teacher(ref.normalize(torch.from_numpy(np.asarray(batch["teacher_image"]))))
        f_logits, _ = model.apply({"params": tp}, models.normalize_images(batch["teacher_image"]))
        np.testing.assert_allclose(t_logits.numpy(), np.asarray(f_logits), atol=1e-4, rtol=1e-4)
        torch_step = ref.make_distill_step(student, teacher)
        torch_cl_step = ref.make_distill_step(student_cl, teacher_cl, channels_last=True)
        ti, si = (torch.from_numpy(np.asarray(batch[k])) for k in ("teacher_image", "student_image"))
        torch_step(ti, si), torch_cl_step(ti, si)  # warm-up
        times = {"flax": [], "torch": [], "cl": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            st, metrics = step(st, tp, batch)
            jax.block_until_ready(metrics["loss"])
            times["flax"].append(time.perf_counter() - t0)
            if args.skip_torch:
                continue
            t0 = time.perf_counter()
            torch_step(ti, si)
            times["torch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_cl_step(ti, si)
            times["cl"].append(time.perf_counter() - t0)
        fl = np.asarray(times["flax"])
        med = {k: float(np.median(v)) * 1e3 if v else float("nan") for k, v in times.items()}
        ratio = lambda k: float(np.median(fl / np.asarray(times[k]))) if times[k] else float("nan")  # noqa: E731
        flops = args.batch * (forward_flops(256) + 3 * forward_flops(256 // factor))
        gfs = flops / (med["flax"] / 1e3) / 1e9
        print(f"{factor:>3}{256 // factor:>11}{med['flax']:>9.1f}{med['torch']:>9.1f}{med['cl']:>10.1f}"
              f"{ratio('torch'):>12.2f}{ratio('cl'):>9.2f}{gfs:>14.1f}{100 * gfs / peak:>7.0f}%"
              f"   (first step incl. compile {compile_s:.1f} s)", flush=True)

    if args.skip_inference:
        return
    print(f"inference, batch 64, {args.rounds} interleaved rounds (images/s, median)")
    print(f"{'px':>5}{'flax':>9}{'torch':>9}{'torch CL':>10}{'flax/torch':>12}{'speedup vs 256':>16}{'FLOP ratio':>12}"
          f"{'% of ratio':>12}")
    base = None
    for px in (256, 128, 64, 32):
        model = models.ResNetGN(num_classes=3, widths=WIDTHS)
        params = state.init_params(model, rng=jax.random.key(0), input_px=px)
        images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, px, px, 3), dtype=np.uint8))
        fwd = jax.jit(functools.partial(steps.eval_step, model=model, image_key="image"))
        tm = ref.load_flax_params(ref.TorchResNetGN(3), jax.device_get(params)).eval()
        tm_cl = ref.load_flax_params(ref.TorchResNetGN(3), jax.device_get(params)).eval().to(
            memory_format=torch.channels_last)
        x = torch.from_numpy(np.asarray(images))
        jax.block_until_ready(fwd(params, {"image": images}))
        times = {"flax": [], "torch": [], "cl": []}
        with torch.no_grad():
            tm(ref.normalize(x)), tm_cl(ref.normalize(x).contiguous(memory_format=torch.channels_last))
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                jax.block_until_ready(fwd(params, {"image": images}))
                times["flax"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tm(ref.normalize(x))
                times["torch"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tm_cl(ref.normalize(x).contiguous(memory_format=torch.channels_last))
                times["cl"].append(time.perf_counter() - t0)
        ips = {k: 64 / float(np.median(v)) for k, v in times.items()}
        ratio = float(np.median(np.asarray(times["torch"]) / np.asarray(times["flax"])))
        if base is None:
            base = ips["flax"]
        speedup, flop_ratio = ips["flax"] / base, forward_flops(256) / forward_flops(px)
        print(f"{px:>5}{ips['flax']:>9.0f}{ips['torch']:>9.0f}{ips['cl']:>10.0f}{1 / ratio:>12.2f}"
              f"{speedup:>16.1f}{flop_ratio:>12.1f}{100 * speedup / flop_ratio:>11.0f}%", flush=True)


if __name__ == "__main__":
    main()
