"""The package as users and tools see it: its public names, version and type marker."""

import pathlib
import tomllib

import pytest

import ema_momentum as emm

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_all_lists_exactly_the_public_names():
    public = {name for name in vars(emm) if not name.startswith("_")}
    assert sorted(emm.__all__) == sorted(public) == ["EmaMomentumState", "ema_momentum", "ema_sgd"]
    # The package docstring shows the whole API.
    assert all(name in emm.__doc__ for name in emm.__all__)


def test_version_is_the_one_in_pyproject():
    assert emm.__version__ == PYPROJECT["project"]["version"]


def test_a_py_typed_marker_is_shipped():
    assert (pathlib.Path(emm.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ema_momentum"]


def test_the_build_backend_accepts_the_license_string():
    # A `license = "<SPDX expression>"` string (PEP 639) needs setuptools >= 77:
    # setuptools 76.1.0 stops the build with "`project.license` must be valid exactly by one
    # definition", 77.0.3 builds the wheel.
    assert isinstance(PYPROJECT["project"]["license"], str)
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools.startswith("setuptools>=")
    major = int(setuptools.removeprefix("setuptools>=").split(".")[0])
    assert major >= 77


def test_the_sdist_ships_the_files_its_tests_read(monkeypatch):
    # setuptools puts tests/test*.py in the sdist by default; test_readme compares the README
    # with the exported report under docs/, so the sdist must carry docs/ too (MANIFEST.in,
    # read here by setuptools' own parser) or its tests fail with a FileNotFoundError.
    file_list = pytest.importorskip("setuptools.command.egg_info").FileList()
    monkeypatch.chdir(ROOT)
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            file_list.process_template_line(line)
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*") if p.is_file()}
    assert "docs/results/verdicts.json" in docs
    assert docs <= set(file_list.files)
