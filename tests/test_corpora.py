"""Data resolution: local directory first, clear errors otherwise."""
from __future__ import annotations

import pytest

import corpora.sources as sources
from corpora import DataNotFoundError, calibration_texts, evaluation_text, resolve_data_dir


def test_missing_data_directory_names_the_fix():
    with pytest.raises(DataNotFoundError, match="--data_dir"):
        resolve_data_dir("/no/such/folder")


def test_offline_without_local_data_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setattr(sources, "PROJECT_ROOT", tmp_path / "project")  # no shared/data beside it
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_data_dir() is None
    with pytest.raises(DataNotFoundError, match="pass --data_dir"):
        evaluation_text("wikitext2")


def test_local_layout_is_read(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("\n = Title = \n\n Some text .\n", encoding="utf-8")
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "lambada_bookcorpus.txt").write_text("first passage\n\nsecond passage\n")
    assert "Some text" in evaluation_text("wikitext2", data_dir=tmp_path)
    assert calibration_texts("bookcorpus", data_dir=tmp_path) == ["first passage", "second passage"]
    with pytest.raises(ValueError, match="unknown evaluation set"):
        evaluation_text("imdb", data_dir=tmp_path)
