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


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(p) == 2 for p in pins), "constraints.txt holds only NAME==VERSION lines"
    return {canonicalize_name(name): version for name, version in pins}


def test_constraints_pin_every_requirement_within_its_bounds():
    """constraints.txt is the tested set: each requirement of pyproject.toml pinned to a version it allows."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [
        *project["dependencies"],
        *project["optional-dependencies"]["dev"],
        *project["optional-dependencies"]["det"],
    ]
    pins = _constraints()
    for req in map(Requirement, reqs):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: run python .ci/freeze_constraints.py"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt pins {name}=={pins[name]}, {req}"
    assert pins["torchreid"] == "0.2.5"


def test_ci_installs_into_fresh_venvs_and_tests_the_constraints():
    """CI resolves what a new user resolves (a new venv per run) and also installs the tested set."""
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    test_cmd = _bash_blocks(readme.split("## Quick start", 1)[1].split("\n## ", 1)[0])[1]
    assert ci.index("python3 -m venv") < ci.index("fresh_venv latest") < ci.index(test_cmd)
    assert 'pip install -c constraints.txt -e ".[dev,det]"' in ci and "freeze_constraints.py" in ci
    assert "-c constraints.txt" in readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
