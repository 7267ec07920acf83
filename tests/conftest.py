"""Test-suite settings: deterministic hypothesis, nothing written into the working directory."""

from hypothesis import settings

# derandomize: hypothesis draws from a fixed seed, so every run checks the same examples;
# database=None: no .hypothesis/ folder in the working directory.
settings.register_profile("bct", derandomize=True, database=None, deadline=None)
settings.load_profile("bct")
