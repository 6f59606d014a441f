"""Every registered method (and variants of its options) gives the record and the logits stored before the
options refactor (tests/data/fingerprints.json, written by ``python -m bench.fingerprint``)."""
from __future__ import annotations

import json

import pytest

from bench import fingerprint


@pytest.fixture(scope="module")
def stored() -> dict:
    return json.loads(fingerprint.FILE.read_text())


def test_every_run_is_fingerprinted(stored):
    assert sorted(stored) == sorted(fingerprint.key(*run) for run in fingerprint.runs())


@pytest.mark.parametrize("method", fingerprint.BASE)
def test_a_method_gives_its_stored_records_and_logits(method, stored):
    for run in (run for run in fingerprint.runs() if run[0] == method):
        now = json.loads(json.dumps(fingerprint.fingerprint(*run)))
        assert not fingerprint.differences(stored[fingerprint.key(*run)], now), fingerprint.key(*run)
