"""Slide manifest parsing and validation."""

from __future__ import annotations

import pathlib

import pytest

from histokd_jax.data.manifest import read_manifest

CLASSES = ("Abnormal", "Normal", "Sprue")


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_rows_are_parsed_with_relative_and_absolute_paths(tmp_path):
    absolute = tmp_path / "elsewhere" / "c.svs"
    path = write(tmp_path, f"slide,label,split,mpp\nslides/a.svs,Normal,train,\nslides/b.svs,,train,0.25\n{absolute},Sprue,test,\n")
    entries = read_manifest(path, class_names=CLASSES)
    assert [e.path for e in entries] == [tmp_path / "slides/a.svs", tmp_path / "slides/b.svs", absolute]
    assert [e.label for e in entries] == ["Normal", None, "Sprue"]
    assert [e.split for e in entries] == ["train", "train", "test"]
    assert [e.mpp for e in entries] == [None, 0.25, None]
    assert [e.line for e in entries] == [2, 3, 4]


def test_mpp_column_is_optional_and_blank_lines_are_ignored(tmp_path):
    entries = read_manifest(write(tmp_path, "slide,label,split\na.svs,Abnormal,val\n\n"), class_names=CLASSES)
    assert len(entries) == 1 and entries[0].mpp is None


def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path):
    text = (
        "slide,label,split,mpp\n"
        "a.svs,Cancer,train,\n"  # unknown class
        "b.svs,Normal,holdout,\n"  # unknown split
        "c.svs,,val,\n"  # unlabelled outside train
        "d.svs,Normal,train,abc\n"  # bad mpp
        "e.svs,Normal,train,-1\n"  # non-positive mpp
        "a.svs,Normal,test,\n"  # duplicate
        ",Normal,train,\n"  # empty path
    )
    with pytest.raises(ValueError) as err:
        read_manifest(write(tmp_path, text), class_names=CLASSES)
    message = str(err.value)
    assert "7 problem(s)" in message
    for fragment in ("line 2: class 'Cancer'", "line 3: split 'holdout'", "line 4: an unlabelled slide",
                     "line 5: mpp 'abc'", "line 6: mpp '-1'", "line 7: slide a.svs already listed on line 2",
                     "line 8: empty slide path"):
        assert fragment in message


def test_missing_columns_and_missing_file_and_empty_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['split'\]"):
        read_manifest(write(tmp_path, "slide,label\na.svs,Normal\n"), class_names=CLASSES)
    with pytest.raises(FileNotFoundError, match="no slide manifest"):
        read_manifest(tmp_path / "nope.csv", class_names=CLASSES)
    with pytest.raises(ValueError, match="lists no slides"):
        read_manifest(write(tmp_path, "slide,label,split\n"), class_names=CLASSES)
