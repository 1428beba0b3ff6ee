"""Write constraints.txt: the installed versions of everything `pip install -e ".[dev,det]"` and torchreid pull in.

Run it inside the environment the test suite just passed in: `python .ci/freeze_constraints.py > constraints.txt`.
Only the dependency closure of this project is written, not whatever else the environment holds.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "det")
EXTRA_ROOTS = ("torchreid",)  # installed by the README's test command with --no-deps


def _roots() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def closure() -> dict[str, str]:
    """Map each distribution of the dependency closure to its installed version."""
    pinned: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()  # a distribution asked for with new extras pulls in more
    roots = [r for r in _roots() if r.marker is None or r.marker.evaluate({"extra": ""})]
    todo = [(r, "deps") for r in roots] + [(Requirement(n), "no-deps") for n in EXTRA_ROOTS]
    while todo:
        req, mode = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed in {sys.prefix}: install the project first")
        pinned[name] = dist.version
        if mode == "no-deps":
            continue
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            # markers are evaluated here, where the extras that the parent was asked for are known
            if sub_req.marker is None or any(sub_req.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append((sub_req, "deps"))
    return pinned


def main() -> None:
    print("# The versions the test suite last passed with (`python .ci/freeze_constraints.py > constraints.txt`).")
    print('# Install the tested set: pip install -c constraints.txt -e ".[dev,det]"')
    for name, version in sorted(closure().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
