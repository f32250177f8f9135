"""The settings record shared by the resumable offline jobs."""

import json

import pytest

from hf_distill.jobs import check_or_record_settings


def test_settings_are_recorded_then_checked(tmp_path):
    path = str(tmp_path / "settings.json")
    check_or_record_settings(path, {"k": 64, "model": "m"}, "caches")
    assert json.loads((tmp_path / "settings.json").read_text()) == {"k": 64, "model": "m"}
    assert not (tmp_path / "settings.json.tmp").exists()  # written atomically
    check_or_record_settings(path, {"k": 64, "model": "m"}, "caches")  # same settings: resume
    with pytest.raises(ValueError, match=r"holds caches made with other settings \(\{'k': \(64, 16\)\}"):
        check_or_record_settings(path, {"k": 16, "model": "m"}, "caches")
