"""The package as users and tools see it: its public names, version and type marker."""

import pathlib
import tomllib

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
