"""Exports for the tools pathologists use (``histokd_jax.export``): the TorchScript and ONNX models compute the
Flax model's logits, and the WSInfer config, read by WSInfer's own code, turns a tile into the input they take.
The reference is always the Flax model on the same uint8 tiles; the PyTorch module is written separately."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the exports need torch: pip install 'histokd_jax[export]'")

from histokd_jax import export, models, torch_model  # noqa: E402
from histokd_jax.inference import RunModel  # noqa: E402

WIDTHS, BLOCKS, CLASSES = (16, 32, 64), (2, 1, 1), 3  # a second block in stage 1: identity shortcuts too


def random_run_model(*, padding: str, input_px: int, seed: int = 0, input_mpp: float | None = 2.0) -> RunModel:
    """A RunModel with random parameters, GroupNorm scales and offsets included (not 1 and 0)."""
    net = models.ResNetGN(num_classes=CLASSES, widths=WIDTHS, blocks_per_stage=BLOCKS, num_groups=8, padding=padding)
    params = net.init(jax.random.key(seed), jnp.zeros((1, input_px, input_px, 3)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return RunModel(role="distill", workdir=pathlib.Path("/nonexistent"), stage_dir=pathlib.Path("/nonexistent"),
                    net=net, params=params, class_names=("a", "b", "c"), input_px=input_px, input_mpp=input_mpp)


@pytest.mark.parametrize("padding", models.PADDINGS)
@pytest.mark.parametrize("input_px", [32, 33, 64])  # odd sizes: XLA's SAME pads a stride-2 layer unevenly
def test_the_torchscript_model_computes_the_flax_logits(padding, input_px, tmp_path):
    found = random_run_model(padding=padding, input_px=input_px, seed=input_px)
    tiles = export.check_tiles(input_px, count=5, seed=1)
    want = export.flax_logits(found, tiles)
    module = torch_model.from_flax(export.jax_to_numpy(found.params), net=found.net)
    check = export.check_tiles(input_px, seed=2)  # the export's own check, on other tiles
    export.write_torchscript(module, tmp_path / "model.pt", tiles=check, want=export.flax_logits(found, check))
    loaded = torch.jit.load(tmp_path / "model.pt")  # what WSInfer loads: no histokd_jax code needed
    with torch.no_grad():
        got = loaded(torch.from_numpy(export.normalized_nchw(tiles))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.ptp(want) > 0.1  # the check compares something: logits differ between tiles and classes


def test_the_onnx_model_computes_the_flax_logits_under_onnxruntime_at_any_batch_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="pip install 'histokd_jax[export]'")
    pytest.importorskip("onnxscript", reason="pip install 'histokd_jax[export]'")
    found = random_run_model(padding="same", input_px=32)
    module = torch_model.from_flax(export.jax_to_numpy(found.params), net=found.net)
    check = export.check_tiles(32, seed=2)
    export.write_onnx(module, tmp_path / "model.onnx", tiles=check, want=export.flax_logits(found, check))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for count in (1, 7):  # not the batch size it was exported with
        tiles = export.check_tiles(32, count=count, seed=count)
        got = session.run(["logits"], {"image": export.normalized_nchw(tiles)})[0]
        np.testing.assert_allclose(got, export.flax_logits(found, tiles), atol=1e-4, rtol=1e-4)


def test_an_export_that_computes_other_logits_is_not_kept(tmp_path):
    found = random_run_model(padding="same", input_px=32)
    module = torch_model.from_flax(export.jax_to_numpy(found.params), net=found.net)
    tiles = export.check_tiles(32)
    with pytest.raises(RuntimeError, match="nothing was kept"):
        export.write_torchscript(module, tmp_path / "model.pt", tiles=tiles, want=export.flax_logits(found, tiles) + 0.1)
    assert list(tmp_path.iterdir()) == []


def test_parameters_of_another_architecture_do_not_load():
    found = random_run_model(padding="same", input_px=32)
    other = models.ResNetGN(num_classes=CLASSES, widths=WIDTHS, blocks_per_stage=(1, 1, 1), num_groups=8)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # stage 1's second block has nowhere to go
        torch_model.from_flax(export.jax_to_numpy(found.params), net=other)


def test_the_wsinfer_config_is_valid_and_its_transform_makes_the_models_input():
    """WSInfer's own config reader and transform builder, on a PIL tile, give what the model expects."""
    pytest.importorskip("wsinfer", reason="WSInfer is not installed: pip install 'histokd_jax[test]'")
    from tests.wsinfer_cli import make_torchvision_importable

    make_torchvision_importable()
    from PIL import Image
    from wsinfer.modellib.transforms import make_compose_from_transform_config
    from wsinfer_zoo.client import ModelConfiguration, validate_config_json

    found = random_run_model(padding="same", input_px=40, input_mpp=4.0)
    config = json.loads(json.dumps(export.wsinfer_config(found)))  # as written to config.json
    assert validate_config_json(config)
    parsed = ModelConfiguration.from_dict(config)
    assert (parsed.patch_size_pixels, parsed.spacing_um_px, parsed.num_classes) == (40, 4.0, 3)
    assert parsed.class_names == ["a", "b", "c"]
    tile = export.check_tiles(40, count=1, seed=3)[0]
    made = make_compose_from_transform_config(parsed.transform)(Image.fromarray(tile)).numpy()
    np.testing.assert_allclose(made, export.normalized_nchw(tile[None])[0], atol=1e-6)


def test_a_run_of_unknown_resolution_is_refused_with_the_fix():
    found = random_run_model(padding="same", input_px=32, input_mpp=None)
    with pytest.raises(ValueError, match="--teacher_mpp"):
        export.wsinfer_config(found)


def test_an_existing_export_is_not_overwritten(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"earlier work")
    with pytest.raises(FileExistsError, match="model.pt"):
        export.export_run(tmp_path / "not_a_run", out=tmp_path)
    assert (tmp_path / "model.pt").read_bytes() == b"earlier work"
