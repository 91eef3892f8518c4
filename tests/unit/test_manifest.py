"""A manifest that parses as JSON but breaks the schema is an ArtifactError, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.errors import ArtifactError
from serving.manifest import MANIFEST_FILE, Manifest, list_versions, load_manifest, resolve


def good_manifest(store: Path) -> dict:
    version_dir = resolve(store, "seq_lstm", list_versions(store, "seq_lstm")[-1])
    return json.loads((version_dir / MANIFEST_FILE).read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: [d], "JSON object"),
        (lambda d: "manifest", "JSON object"),
        (lambda d: {**d, "version": "1"}, "schema"),
        (lambda d: {**d, "graphs": []}, "schema"),
        (lambda d: {**d, "files": None}, "schema"),
        (lambda d: {**d, "input": {**d["input"], "max_steps": None}}, "max_steps"),
        (lambda d: {**d, "input": {**d["input"], "max_steps": "16"}}, "max_steps"),
        (lambda d: {**d, "input": {**d["input"], "max_steps": 0}}, "max_steps"),
    ],
    ids=[
        "list",
        "string",
        "version-as-text",
        "graphs-list",
        "files-null",
        "max-steps-null",
        "max-steps-text",
        "max-steps-zero",
    ],
)
def test_a_malformed_manifest_is_an_artifact_error(quick_store, tmp_path, change, message):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(change(good_manifest(quick_store))))
    with pytest.raises(ArtifactError, match=message):
        load_manifest(tmp_path, verify=False)


def test_the_good_manifest_still_loads(quick_store):
    m = Manifest.from_dict(good_manifest(quick_store))
    assert m.name == "seq_lstm" and m.streamable


def test_only_folders_named_by_ascii_digits_from_1_are_versions(tmp_path):
    odd = ("²", "0", "v3", "٣", "007", "01", str(2**32))  # superscript two, Arabic-Indic three
    for folder in ("1", "12", *odd):
        (tmp_path / "m" / folder).mkdir(parents=True)
        (tmp_path / "m" / folder / MANIFEST_FILE).write_text("{}")
    (tmp_path / "m" / "7").mkdir()  # no manifest: no version
    assert list_versions(tmp_path, "m") == [1, 12]
