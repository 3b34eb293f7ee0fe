"""Executes the quickstart notebook with its CI settings and checks every cell ran and drew."""

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")
ipykernel_spec = pytest.importorskip("ipykernel.kernelspec")
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = Path(__file__).parents[1] / "experiments" / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 300


class ThisInterpreter(kernelspec.KernelSpecManager):
    """Resolves every kernel name to an IPython kernel running on this test's interpreter.

    An installed ``python3`` kernelspec may launch whatever ``python`` is first on PATH, which
    need not have this project installed.
    """

    def get_kernel_spec(self, kernel_name):
        spec = ipykernel_spec.get_kernel_dict()
        assert spec["argv"][0] == sys.executable
        return kernelspec.KernelSpec(resource_dir=ipykernel_spec.RESOURCES, **spec)


class ThisInterpreterKernelManager(KernelManager):
    """A kernel manager that starts kernels with :class:`ThisInterpreter`'s spec.

    Passed as nbclient's ``kernel_manager_class``, so nbclient owns the kernel and shuts it down
    and closes its channels when the notebook is done.
    """

    def __init__(self, **kwargs):
        super().__init__(kernel_spec_manager=ThisInterpreter(), **kwargs)


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert not any("XLA_FLAGS" in c.source for c in nb.cells)


def test_notebook_runs_top_to_bottom_in_quick_mode(tmp_path, monkeypatch):
    # The kernel inherits this environment: conftest's 8 simulated CPU devices, and quick mode.
    monkeypatch.setenv("EMM_NOTEBOOK_QUICK", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_manager_class=ThisInterpreterKernelManager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend: cpu" in text and "8 device(s)" in text
    assert "test accuracy:" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
