"""Test-suite settings: deterministic hypothesis, nothing written into the working directory."""

import tempfile

import pytest

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# hypothesis keeps a small cache of constants; keep it out of the working directory
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="bct-hypothesis-"))

# derandomize: hypothesis draws from a fixed seed, so every run checks the same examples;
# database=None: no .hypothesis/ folder in the working directory.
settings.register_profile("bct", derandomize=True, database=None, deadline=None)
settings.load_profile("bct")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run in an empty directory and check nothing was written into it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir())
