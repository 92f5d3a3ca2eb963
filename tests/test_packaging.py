"""A non-editable install (`pip install .`) carries the default draft and finds it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_a_non_editable_install_finds_the_default_draft(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, REPO],
        check=True,
        capture_output=True,
    )
    probe = (
        "import scheduler.loading as l; from scheduler.loading import shown; "
        "print(l.__file__); print(l.DEFAULT_SMALL_DIR); print(shown(l.DEFAULT_SMALL_DIR))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    module, draft, shown = out[:3]
    assert module.startswith(str(site)), module  # the installed copy, not this checkout
    draft = Path(draft)
    assert draft.is_relative_to(site) and draft.name == "smollm2-135m-draft", draft
    for name in ("config.json", "model.safetensors", "tokenizer.json", "output_vocab.json"):
        assert (draft / name).is_file(), name
    assert shown == "bild/models/smollm2-135m-draft"  # no machine path in what a report prints


def test_shipped_model_files_hold_no_machine_paths():
    """A shipped file names what it came from relative to its folder, never a path of the machine that made it."""
    import json
    import re

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    checked = 0
    for path in (REPO / "models").rglob("*.json"):
        if path.name in ("tokenizer.json", "output_vocab.json"):  # vocabularies: "/" is a token
            continue
        for text in strings(json.loads(path.read_text())):
            path_like = re.match(r"^(/|~/|[A-Za-z]:\\)\w", text)
            assert not path_like, f"{path.relative_to(REPO)} holds a machine path: {text}"
            checked += 1
    assert checked > 0
