import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_two_setup_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    block = re.match(r"# [^\n]+\n\n```sh\n(.*?)\n```", text, re.S)
    assert block, "README.md must open with a sh block"
    lines = block.group(1).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("pip install torch==2.13.0") and lines[0].endswith("bct demo")
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and "README.md" in ci and 'eval "$test_cmd"' in ci
