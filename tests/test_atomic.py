"""atomic.py: a file a later step reads is either the old one, or the complete new one; never half."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histokd_jax import atomic


class Boom(Exception):
    pass


def test_a_write_that_raises_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"old": true}')
    with pytest.raises(Boom):
        with atomic.atomic_open(path, "w") as handle:
            handle.write('{"new": ')  # half written when the failure comes
            handle.flush()
            raise Boom
    assert path.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_write_that_raises_creates_nothing_when_there_was_no_file(tmp_path):
    with pytest.raises(Boom):
        with atomic.atomic_open(tmp_path / "sub" / "x.bin", "wb") as handle:
            handle.write(b"partial")
            raise Boom
    assert list((tmp_path / "sub").iterdir()) == []


def test_a_successful_write_replaces_the_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    atomic.write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    atomic.write_text(path, "plain µ text")
    assert path.read_bytes() == "plain µ text".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_save_npz_and_save_npy_write_exactly_the_path_given(tmp_path):
    coords = np.arange(12, dtype=np.int64).reshape(6, 2)
    atomic.save_npz(tmp_path / "index.cache", coords=coords, mpp=np.float64(0.5))  # no .npz added
    atomic.save_npy(tmp_path / "maps", coords)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.cache", "maps"]
    with np.load(tmp_path / "index.cache") as data:
        np.testing.assert_array_equal(data["coords"], coords)
        assert float(data["mpp"]) == 0.5
    np.testing.assert_array_equal(np.load(tmp_path / "maps"), coords)


def test_a_finished_file_is_as_readable_as_a_plain_write(tmp_path):
    atomic.write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")  # open() applies the umask to 0666; mkstemp alone gives 0600
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_only_whole_file_writes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode must start with 'w'"):
        with atomic.atomic_open(tmp_path / "x", "a"):
            pass


KILLED_WRITER = """
import sys, time
from histokd_jax import atomic
with atomic.atomic_open(sys.argv[1], "w") as handle:
    handle.write("half of the new ")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)  # SIGKILLed here, mid-write
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    import os
    import pathlib
    import signal
    import stat
    import subprocess
    import sys

    target = tmp_path / "result.json"
    target.write_text("old")
    os.chmod(target, 0o640)  # chosen by the user: a rewrite keeps it
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_text() == "old"  # never half a file
    left = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    assert len(left) == 1 and left[0].startswith(".result.json.") and left[0].endswith(".partial")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the killed writer's temporary file is gone
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
