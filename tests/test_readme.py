"""The README is the front door: its two commands exist and CI runs the test command verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(quick)
    assert len(blocks) == 2, blocks
    main_cmd, test_cmd = blocks
    assert "pip install" in main_cmd and "pip install" in test_cmd and "pytest" in test_cmd
    assert test_cmd in (REPO / ".ci" / "run").read_text()
