"""The suite runs whole from a clone: reference data lives in tests/shared, skips say why, and CI fails when a
``fidelity`` test did not run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TESTS = REPO / "tests"


def test_reference_data_is_in_the_repository():
    shared = TESTS / "shared"
    for part in (
        "tokenizers/ggml-vocab-llama-spm.gguf",
        "tokenizers/ggml-vocab-qwen2.gguf",
        "fixtures/templates/cases.json",
        "fixtures/lavis-tiny/expected.safetensors",
        "fixtures/lavis-tiny/eva_vit.pth",
        "fixtures/lavis-tiny/blip2.pth",
        "fixtures/lavis-tiny/minigpt4_proj.pth",
    ):
        assert (shared / part).is_file(), part
    size = sum(f.stat().st_size for f in shared.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"tests/shared is {size / 2**20:.1f} MiB"


def _pytest(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess:
    """Run one test file in ``tmp_path`` with this suite's conftest hooks loaded as a plugin."""
    (tmp_path / "test_probe.py").write_text(body)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    fidelity: x\naddopts = -rs -p no:cacheprovider\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "MINIGPT_SHARED")}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO / "src"), environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "test_probe.py"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


PROBE = """
import pytest
from conftest import shared_path

@pytest.mark.fidelity
def test_other_skip():
    pytest.skip("no reason to run")

def test_needs_shared():
    shared_path("fixtures", "nothing-here")
"""


def test_skips_are_explained_and_fail_under_ci(tmp_path):
    local = _pytest(tmp_path, PROBE, MINIGPT_SHARED=str(tmp_path))
    assert local.returncode == 0, local.stdout + local.stderr
    assert "SKIPPED" in local.stdout and "no reason to run" in local.stdout
    assert f"shared material not present: {tmp_path / 'fixtures' / 'nothing-here'}" in local.stdout
    assert "1 fidelity test(s) did not run" in local.stdout

    ci = _pytest(tmp_path, PROBE, MINIGPT_SHARED=str(tmp_path), CI="true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "1 failed" in ci.stdout and "shared material not present" in ci.stdout  # a missing file fails
    assert "1 fidelity test(s) did not run (CI fails the run): test_probe.py::test_other_skip" in ci.stdout


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_ci_off_values(tmp_path, value):
    assert _pytest(tmp_path, PROBE, MINIGPT_SHARED=str(tmp_path), CI=value).returncode == 0
