"""Each workspace member installed alone, as its image or wheel is: every module imports.

`uv sync --all-packages` puts every member's dependencies in one environment, where an
import a member forgot to declare still works. Here each member gets an environment of its
own from the lock (`uv sync --package`), so an undeclared dependency fails this test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
MEMBERS = sorted(
    path.parent
    for pattern in ("libs/*", "services/*", "tools/*")
    for path in ROOT.glob(f"{pattern}/pyproject.toml")
)
IMPORT_ALL = """
import importlib, pkgutil, sys
for root in sys.argv[1:]:
    package = importlib.import_module(root)
    for module in pkgutil.walk_packages(package.__path__, root + "."):
        if not module.name.rsplit(".", 1)[-1] == "__main__":
            importlib.import_module(module.name)
"""


def _uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".tools/bin/uv")
    assert Path(found).exists(), "uv is not on PATH (./just installs it into .tools/bin)"
    return found


def _project(member: Path) -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((member / "pyproject.toml").read_text())["project"]
    return project


@pytest.mark.parametrize("member", MEMBERS, ids=lambda member: member.name)
def test_every_module_imports_with_the_members_own_dependencies(
    member: Path, tmp_path: Path
) -> None:
    name = str(_project(member)["name"])
    environment = tmp_path / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(environment)}
    env.pop("VIRTUAL_ENV", None)
    synced = subprocess.run(
        [
            _uv(),
            "sync",
            "--frozen",
            "--no-dev",
            "--package",
            name,
            "--all-extras",
            "--quiet",
            "--python",
            sys.executable,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synced.returncode == 0, synced.stderr
    packages = sorted(
        path.name for path in (member / "src").iterdir() if (path / "__init__.py").exists()
    )
    assert packages, f"{member} has no package under src/"
    imported = subprocess.run(
        [str(environment / "bin/python"), "-c", IMPORT_ALL, *packages],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, f"{name} alone: {imported.stderr[-2000:]}"


def test_the_envelope_depends_on_pydantic_and_orjson_only() -> None:
    dependencies = _project(ROOT / "libs/envelope")["dependencies"]
    assert isinstance(dependencies, list)
    names = {
        requirement.split(">")[0].split("=")[0].split("[")[0].strip()
        for requirement in dependencies
    }
    assert names == {"pydantic", "orjson"}
    assert "optional-dependencies" not in _project(ROOT / "libs/envelope")
