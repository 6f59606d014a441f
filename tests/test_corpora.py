"""Data resolution: local directory first, clear errors otherwise."""
from __future__ import annotations

import re

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


def _numbered_corpus(tmp_path, count: int = 200):
    """A calibration corpus whose every passage is one distinct word, and a tokenizer that keeps words apart."""
    from tests.test_zeroshot import _byte_tokenizer

    (tmp_path / "calibration").mkdir()
    passages = [f"p{index:03d}" for index in range(count)]
    (tmp_path / "calibration" / "lambada_bookcorpus.txt").write_text("\n\n".join(passages))
    return passages, _byte_tokenizer()


def test_heldout_windows_come_from_documents_calibration_never_reads(tmp_path):
    from corpora import calibration_batches, heldout_batches

    passages, tokenizer = _numbered_corpus(tmp_path)
    def passages_in(batch) -> set[str]:
        return {word for row in batch for word in re.findall(r"p\d{3}", tokenizer.decode(row))}

    # asking for more than the corpus makes calibration read every document it may read
    seen = passages_in(calibration_batches(tokenizer, "bookcorpus", 400, 8, seed=1, data_dir=tmp_path))
    held = passages_in(heldout_batches(tokenizer, "bookcorpus", 12, 8, seed=1, data_dir=tmp_path))
    assert 0 < len(held) <= 20 and len(seen) > 100  # 200 passages: 20 held out
    assert not seen & held
    with pytest.raises(ValueError, match="ask for at most"):
        heldout_batches(tokenizer, "bookcorpus", 10_000, 8, seed=1, data_dir=tmp_path)
