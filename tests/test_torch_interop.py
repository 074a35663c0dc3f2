"""PyTorch interop against PyTorch itself: the authors' ResNet-GroupNorm, built here from its
description (torchvision-style BasicBlocks; conv_1/norm_1, layer_{s}.{b}, downsample.0/.1, fc;
padding k // 2; 32 GroupNorm groups with torch's default eps), with random weights, must give the
same logits and stage maps as the imported Flax model."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from histokd_jax import checkpoint, models, parallel, torch_interop  # noqa: E402
from histokd_jax.state import abstract_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
WIDTHS = (32, 64, 128, 256)
BLOCKS = (2, 1, 1, 2)  # second blocks exercise layer_{s}.1 keys and identity shortcuts
CLASSES = 5


class TorchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv_1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm_1 = nn.GroupNorm(32, cout)
        self.conv_2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm_2 = nn.GroupNorm(32, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(32, cout))

    def forward(self, x):
        y = self.norm_2(self.conv_2(F.relu(self.norm_1(self.conv_1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNetGN(nn.Module):
    """Returns (logits, [stage maps]) on NCHW input."""

    def __init__(self, widths=WIDTHS, blocks=BLOCKS, num_classes=CLASSES):
        super().__init__()
        self.conv_1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.norm_1 = nn.GroupNorm(32, widths[0])
        cin = widths[0]
        for s, (width, n) in enumerate(zip(widths, blocks), start=1):
            layers = []
            for b in range(n):
                layers.append(TorchBlock(cin, width, 2 if s > 1 and b == 0 else 1))
                cin = width
            setattr(self, f"layer_{s}", nn.Sequential(*layers))
        self.stages = len(widths)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm_1(self.conv_1(x))), 3, stride=2, padding=1)
        maps = []
        for s in range(1, self.stages + 1):
            x = getattr(self, f"layer_{s}")(x)
            maps.append(x)
        return self.fc(x.mean(dim=(2, 3))), maps


def _random_torch_model(seed: int = 0) -> TorchResNetGN:
    torch.manual_seed(seed)
    net = TorchResNetGN().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():  # GroupNorm affine parameters random too, not 1 and 0
            if "norm" in name or "downsample.1" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return net


def _flax_model(**overrides) -> models.ResNetGN:
    settings = dict(padding="symmetric", norm_epsilon=1e-5) | overrides
    return models.ResNetGN(num_classes=CLASSES, widths=WIDTHS, blocks_per_stage=BLOCKS, **settings)


@pytest.fixture(scope="module")
def torch_net():
    return _random_torch_model()


@pytest.mark.parametrize("px", [64, 50])
def test_imported_weights_reproduce_torch_logits_and_every_stage(torch_net, px):
    x = np.random.default_rng(px).normal(size=(3, 3, px, px)).astype(np.float32)  # NCHW
    with torch.no_grad():
        logits, maps = torch_net(torch.from_numpy(x))
    model = _flax_model()
    params = torch_interop.params_from_torch(torch_net.state_dict(), model=model)
    got_logits, features = jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    for s, ref in enumerate(maps, start=1):
        np.testing.assert_allclose(features[f"stage{s}"], ref.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4,
                                   err_msg=f"stage{s}")


@pytest.mark.parametrize("overrides,named", [(dict(padding="same"), "padding='same'"),
                                              (dict(norm_epsilon=1e-6), "norm_epsilon=1e-06")])
def test_a_model_that_would_compute_otherwise_is_refused(torch_net, overrides, named):
    with pytest.raises(ValueError, match=f"not {named}"):
        torch_interop.params_from_torch(torch_net.state_dict(), model=_flax_model(**overrides))


def test_export_then_import_round_trips_exactly_and_loads_into_torch(torch_net, tmp_path):
    model = _flax_model()
    params = torch_interop.params_from_torch(torch_net.state_dict(), model=model)
    path = torch_interop.export_torch(params, tmp_path / "student.pt")
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["model_state_dict"]
    exported = saved["model_state_dict"]
    assert list(exported) == list(torch_net.state_dict())  # the PyTorch module's own key order
    fresh = TorchResNetGN()
    fresh.load_state_dict(exported, strict=True)
    for key, value in torch_net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    back = torch_interop.params_from_torch(torch_interop.load_torch_state_dict(path), model=model)
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))


def test_bare_and_wrapped_state_dicts_both_load(torch_net, tmp_path):
    state = torch_net.state_dict()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"model_state_dict": state, "epoch": 7}, tmp_path / "wrapped.pt")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "parallel.pt")
    torch.save({"student_model_state_dict": state, "teacher_model_state_dict": state}, tmp_path / "kd.pt")
    for name in ("bare", "wrapped", "parallel"):
        loaded = torch_interop.load_torch_state_dict(tmp_path / f"{name}.pt")
        assert list(loaded) == list(state), name
        assert all(torch.equal(loaded[k], state[k]) for k in state), name
    with pytest.raises(ValueError, match="teacher_model_state_dict"):  # two candidates: the caller must choose
        torch_interop.load_torch_state_dict(tmp_path / "kd.pt")
    assert list(torch_interop.load_torch_state_dict(tmp_path / "kd.pt", key="teacher_model_state_dict")) == list(state)


class NotATensor:
    """A custom object: unpickling it would mean importing and running code named by the file."""

    def __init__(self):
        self.payload = 1


def test_a_file_needing_more_than_weights_is_refused(torch_net, tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"model_state_dict": torch_net.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*custom\.pt.*run code .*NotATensor"):
        torch_interop.load_torch_state_dict(path)


def test_mismatched_state_dicts_name_the_keys(torch_net):
    model = _flax_model()
    state = dict(torch_net.state_dict())
    missing = dict(state)
    del missing["layer_4.1.norm_2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: layer_4\.1\.norm_2\.bias"):
        torch_interop.params_from_torch(missing, model=model)
    extra = dict(state, **{"layer_5.0.conv_1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: layer_5\.0\.conv_1\.weight"):
        torch_interop.params_from_torch(extra, model=model)
    wrong = dict(state, **{"fc.weight": torch.zeros(CLASSES + 1, WIDTHS[-1])})
    with pytest.raises(ValueError, match=r"wrong shapes: fc\.weight \(6, 256\) \(expected \(5, 256\)\)"):
        torch_interop.params_from_torch(wrong, model=model)
    with pytest.raises(ValueError, match=r"missing keys: layer_1\.1\.conv_1\.weight"):  # a model with fewer blocks
        torch_interop.params_from_torch(
            TorchResNetGN(blocks=(1, 1, 1, 2)).state_dict(), model=model)


def _torch_config():
    from histokd_jax.configs import common

    config = common.get_config()
    config.model.padding, config.model.norm_epsilon = "symmetric", 1e-5
    config.model.blocks_per_stage = BLOCKS
    config.data.class_names, config.data.teacher_px = tuple("abcde"), 64
    return config


def test_written_teacher_folder_loads_as_the_best_params(torch_net, tmp_path):
    config = _torch_config()
    model = _flax_model()
    params = torch_interop.params_from_torch(torch_net.state_dict(), model=model)
    folder = torch_interop.write_teacher(params, tmp_path / "imported" / "teacher", config=config, source="t.pt",
                                         input_px=64)
    assert json.loads((folder / "result.json").read_text())["role"] == "teacher"
    run = json.loads((folder.parent / "run.json").read_text())
    assert run["class_names"] == list("abcde") and run["teacher_px"] == 64
    loaded, _ = checkpoint.load_best_params(folder, params_like=abstract_params(model, input_px=64),
                                            mesh=parallel.make_mesh())
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))
    with pytest.raises(FileExistsError):
        torch_interop.write_teacher(params, folder, config=config, source="t.pt", input_px=64)


def test_import_teacher_takes_the_classes_from_the_file(torch_net, tmp_path):
    torch.save({"model_state_dict": torch_net.state_dict()}, tmp_path / "teacher.pt")
    config = _torch_config()
    config.data.class_names = ()
    folder = torch_interop.import_teacher(tmp_path / "teacher.pt", config=config, out=tmp_path / "run" / "teacher")
    loaded, _ = checkpoint.load_best_params(folder, params_like=abstract_params(_flax_model(), input_px=64),
                                            mesh=parallel.make_mesh())
    np.testing.assert_array_equal(loaded["head"]["bias"], torch_net.fc.bias.detach().numpy())  # 5 classes
    config.data.class_names = ("a", "b", "c")
    with pytest.raises(ValueError, match="5 classes"):  # the file's class count against the config's
        torch_interop.import_teacher(tmp_path / "teacher.pt", config=config, out=tmp_path / "other" / "teacher")
    config.data.class_names, config.model.padding = (), "same"
    with pytest.raises(ValueError, match="--config.model.padding=symmetric"):  # the fix, as a flag
        torch_interop.import_teacher(tmp_path / "teacher.pt", config=config, out=tmp_path / "other" / "teacher")
    assert not (tmp_path / "other").exists()


def test_import_command_as_documented(torch_net, tmp_path):
    """launch/import_torch.py as the README runs it writes a teacher folder and says how to use it."""
    torch.save({"model_state_dict": torch_net.state_dict()}, tmp_path / "teacher.pt")
    done = subprocess.run([sys.executable, str(REPO / "launch/import_torch.py"),
                           f"--checkpoint={tmp_path / 'teacher.pt'}", "--config=configs/common.py", "--config.model.blocks_per_stage=(2, 1, 1, 2)",
                           "--config.data.teacher_px=64", "--config.model.padding=symmetric",
                           "--config.model.norm_epsilon=1e-5", f"--out={tmp_path / 'b' / 'teacher'}"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "b" / "teacher" / "result.json").exists() and "--config.teacher.checkpoint=" in done.stdout


def test_export_of_a_run_gives_what_the_torch_model_loads(torch_net, tmp_path):
    """launch/export_torch.py's function on a workdir whose teacher came from torch_net: the exported
    file loads strictly into a fresh PyTorch model and gives back torch_net's exact weights."""
    config = _torch_config()
    params = torch_interop.params_from_torch(torch_net.state_dict(), model=_flax_model())
    torch_interop.write_teacher(params, tmp_path / "run" / "teacher", config=config, source="t.pt", input_px=64)
    (tmp_path / "run" / "config.json").write_text(config.to_json())
    path, differ = torch_interop.export_run_model(tmp_path / "run", model="teacher", out=tmp_path / "t.pt")
    assert differ == []
    fresh = TorchResNetGN()
    fresh.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"], strict=True)
    for key, value in torch_net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
