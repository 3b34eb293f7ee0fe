"""The quickstart notebook: executed with its CI settings (every cell runs and draws, nothing on
stderr), its install cell as on a fresh runtime, and its figure and lr-selection cells on a fake
engine's results."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import chex
import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")
ipykernel_spec = pytest.importorskip("ipykernel.kernelspec")
matplotlib = pytest.importorskip("matplotlib")
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
    # Warnings (deprecations, say) reach a user as stderr text under a cell: none are expected.
    assert not [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend: cpu" in text and "8 device(s)" in text
    assert "test accuracy:" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2


def _cell(nb, cell_id):
    """A code cell's source, found by its id, without IPython magics (lines starting with '%')."""
    (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
    return "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))


def _run_cells(nb, namespace, *cell_ids):
    for cell_id in cell_ids:
        exec(compile(_cell(nb, cell_id), f"<notebook cell {cell_id}>", "exec"), namespace)


def _fake_run_group(data, model, batch_size, beta, lrs, seeds, steps, eval_every, *, target_loss):
    """Stands in for the engine: in each group the second learning rate reaches the target."""
    runs = tuple(
        SimpleNamespace(
            lr=lr,
            seed=seed,
            diverged=False,
            steps_to_target=round(4000 / batch_size / (1 + beta)) if k == 1 else None,
            final_train_loss=1.0 + k,
        )
        for k, lr in enumerate(lrs)
        for seed in seeds
    )
    batch_loss = np.repeat(np.linspace(2.5, 0.5, steps)[None], len(runs), axis=0)
    return SimpleNamespace(runs=runs, batch_loss=batch_loss, wall_seconds=0.0)


@pytest.fixture
def swept(monkeypatch):
    """The notebook's namespace after its sweep cell, run against the fake engine, and pyplot.

    The parameters cell's settings are kept except ``BATCH_SIZES`` and ``BETAS``, set as a user
    would set them: three of each.
    """
    monkeypatch.setenv("EMM_NOTEBOOK_QUICK", "1")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {}
    _run_cells(nb, namespace, "parameters", "imports")
    namespace.update(
        BATCH_SIZES=[16, 64, 256], BETAS=[0.0, 0.5, 0.9], run_group=_fake_run_group, data=None
    )
    _run_cells(nb, namespace, "sweep")
    try:
        yield nb, namespace, plt
    finally:
        plt.close("all")


def test_figures_have_one_line_per_beta(swept, monkeypatch):
    # The figures took one colour per beta from a list of two, so a third beta was left out.
    nb, namespace, plt = swept
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
    _run_cells(nb, namespace, "loss-curves", "steps-to-target")

    curves, steps = shown
    colors = []
    for ax in curves.axes:
        handles, labels = ax.get_legend_handles_labels()
        assert [label.split(" (lr")[0] for label in labels] == [
            "SGD, no momentum",
            "beta=0.5",
            "beta=0.9",
            "target",
        ]
        colors.append([h.get_color() for h in handles[:3]])
    assert colors[0] == colors[1] and len(set(colors[0])) == 3  # one colour per beta, both panels
    (ax,) = steps.axes
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["SGD (beta=0)", "beta=0.5", "beta=0.9", "perfect scaling"]
    assert [h.get_color() for h in handles[:3]] == colors[0]
    for handle, beta in zip(handles[:3], [0.0, 0.5, 0.9], strict=True):
        expected = [round(4000 / b / (1 + beta)) for b in [16, 64, 256]]
        chex.assert_trees_all_close(handle.get_ydata(), np.asarray(expected, float))


def _group(*runs):
    fields = ("lr", "seed", "diverged", "steps_to_target", "final_train_loss")
    runs = tuple(SimpleNamespace(**dict(zip(fields, run, strict=True))) for run in runs)
    return SimpleNamespace(runs=runs)


def test_best_lr_is_the_rule_the_notebook_states(swept):
    # "the learning rate that reaches the train-loss target in the fewest steps (mean over seeds;
    # if none reaches it, the lowest final train loss)"; an lr that diverged in a seed never wins.
    best_lr = swept[1]["best_lr"]
    reached = _group(
        (0.1, 0, False, 300, 0.5), (0.1, 1, False, 100, 0.5),  # mean 200
        (0.3, 0, False, 160, 0.4), (0.3, 1, False, 140, 0.4),  # mean 150: the best
        (1.0, 0, False, 50, 0.3), (1.0, 1, False, None, 0.9),  # one seed misses the target
        (3.0, 0, False, 10, 0.1), (3.0, 1, True, 10, None),  # one seed diverged
    )  # fmt: skip
    assert best_lr(reached) == (0.3, 150.0)
    not_reached = _group(
        (0.1, 0, False, None, 0.8), (0.1, 1, False, None, 0.6),  # mean 0.7
        (0.3, 0, False, 40, 0.4), (0.3, 1, False, None, 0.8),  # mean 0.6: the best
        (1.0, 0, True, None, None), (1.0, 1, False, None, 0.1),
    )  # fmt: skip
    assert best_lr(not_reached) == (0.3, None)


@pytest.fixture
def install_cell(monkeypatch):
    """Runs the install cell as on a fresh runtime (nothing importable); pip is recorded, not run.

    Returns a function of ``PROJECT``'s value (Python source), the preinstalled JAX's version,
    what pip answers (exit status, stdout, stderr) and the versions it installs over installed
    distributions (name to version) that returns pip's argument list and the
    constraints file's text, or ``None`` when the cell did not call pip. As on Colab, whose kernel
    does not forward a child process's own output to the notebook, pip's output reaches the
    notebook only if the cell captures it.
    """
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = _cell(nb, "install")
    assert source.count("\nPROJECT = None") == 1

    def run(project="None", missing=True, jax_version=None, pip=(0, "", ""), replaces=None):
        calls = []
        installed = importlib.metadata.version
        versions = {} if jax_version is None else {"jax": jax_version, "jaxlib": jax_version}

        def version(name):
            return versions[name] if name in versions else installed(name)

        def fake_run(cmd, *, capture_output=False, check=False, text=False, **kwargs):
            constraints = Path(cmd[cmd.index("-c") + 1])
            calls.append((cmd, constraints.read_text()))
            constraints.unlink()
            versions.update(replaces or {})  # what pip installed in place of what was there
            code, out, err = pip
            if not (capture_output and text):
                out = err = None  # lost (or bytes, which the cell should not get)
            if check and code:
                raise subprocess.CalledProcessError(code, cmd, out, err)
            return subprocess.CompletedProcess(cmd, code, out, err)

        code = source.replace("\nPROJECT = None", f"\nPROJECT = {project}")
        with monkeypatch.context() as m:
            m.setattr(subprocess, "run", fake_run)
            if missing:
                m.setattr(importlib.util, "find_spec", lambda name, package=None: None)
            m.setattr(importlib.metadata, "version", version)
            exec(compile(code, "<notebook cell install>", "exec"), {})
        assert len(calls) <= 1
        return calls[0] if calls else None

    return run


def _pins():
    return "".join(f"{p}=={importlib.metadata.version(p)}\n" for p in ("jax", "jaxlib"))


def test_install_cell_installs_the_repository_above_the_notebook(install_cell, monkeypatch):
    monkeypatch.chdir(NOTEBOOK.parent)  # Jupyter's working directory
    cmd, constraints = install_cell()
    assert cmd[:5] == [sys.executable, "-m", "pip", "install", "-q"]
    assert cmd[-1] == f"{NOTEBOOK.parents[2]}[experiments]"
    assert constraints == _pins()  # the installed JAX is kept


def test_install_cell_takes_a_relative_folder_or_a_url(install_cell, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no repository here or above
    if not Path("/content/ema_momentum/pyproject.toml").is_file():  # where Colab uploads go
        with pytest.raises(FileNotFoundError, match="set PROJECT"):
            install_cell()
    monkeypatch.chdir(NOTEBOOK.parent)
    cmd, _ = install_cell(project="'../..'")
    assert cmd[-1] == f"{NOTEBOOK.parents[2]}[experiments]"
    cmd, constraints = install_cell(project="'git+https://example.org/ema_momentum.git'")
    assert cmd[-1] == "ema-momentum[experiments] @ git+https://example.org/ema_momentum.git"
    assert constraints == _pins()


def test_install_cell_shows_what_pip_says(install_cell, monkeypatch, capsys):
    # Colab's kernel drops a child process's own output: pip's warnings and errors never showed,
    # and a failed install said only that pip exited with status 1.
    monkeypatch.chdir(NOTEBOOK.parent)
    warning = "ERROR: pip's dependency resolver does not currently take into account ...\n"
    install_cell(pip=(0, "", warning))
    assert capsys.readouterr().err == warning
    error = "ERROR: No matching distribution found for flax>=0.12\n"
    with pytest.raises(RuntimeError, match=r"pip failed \(exit status 1\); its messages are above"):
        install_cell(pip=(1, "", error))
    assert capsys.readouterr().err == error


def test_install_cell_stops_when_pip_replaced_a_package_already_imported(install_cell, monkeypatch):
    # The prose told users to restart "if pip reports that it changed a package this runtime had
    # already imported", but pip never says so (Colab's warning comes from its `!pip` magic, not
    # from pip): the notebook went on with the old numpy loaded and the new one on disk.
    monkeypatch.chdir(NOTEBOOK.parent)
    numpy_version = importlib.metadata.version("numpy")  # numpy is imported in this process
    with pytest.raises(RuntimeError, match=rf"numpy {numpy_version} -> 0\.0\.1\).*restart"):
        install_cell(replaces={"numpy": "0.0.1"})
    # A distribution installed but not imported here may change without a restart.
    imported = {name.partition(".")[0] for name in sys.modules}
    provided = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provided.setdefault(dist, set()).add(name)
    unimported = sorted(dist for dist, names in provided.items() if not names & imported)
    assert install_cell(replaces={unimported[0]: "0.0.1", "newly-installed": "1.0"})


def test_install_cell_does_nothing_when_everything_is_importable(install_cell, monkeypatch):
    monkeypatch.chdir(NOTEBOOK.parent)
    assert install_cell(missing=False) is None


@pytest.mark.parametrize("version", ["0.6.2", "0.7.0", "0.4.36.dev20241120"])
def test_install_cell_stops_at_a_preinstalled_jax_too_old_to_keep(
    install_cell, monkeypatch, version
):
    # Pinned, pip could only fail, and with -q it printed no reason (jax >= 0.7.1 is needed).
    monkeypatch.chdir(NOTEBOOK.parent)
    with pytest.raises(RuntimeError, match=rf"jax {version} is older than the jax >= 0\.7\.1"):
        install_cell(jax_version=version)


@pytest.mark.parametrize("version", ["0.7.1", "0.8.0rc1", "0.10.2"])
def test_install_cell_keeps_a_preinstalled_jax_new_enough(install_cell, monkeypatch, version):
    monkeypatch.chdir(NOTEBOOK.parent)
    _, constraints = install_cell(jax_version=version)
    assert constraints == f"jax=={version}\njaxlib=={version}\n"


@pytest.mark.parametrize("quick", ["1", "0"])
def test_lr_grid_is_the_main_studys_as_the_notebook_says(quick, monkeypatch):
    # "its five largest, c/3.16 .. 31.6c, as in the main study (every other one of them in
    # quick mode)"
    from experiments.study import sweep_lrs

    monkeypatch.setenv("EMM_NOTEBOOK_QUICK", quick)
    matplotlib.use("Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {}
    _run_cells(nb, namespace, "parameters", "imports")
    namespace.update(BATCH_SIZES=[], run_group=None, data=None)  # the sweep loop runs nothing
    _run_cells(nb, namespace, "sweep")
    for batch_size in (8, 32, 100, 512):
        grid = sweep_lrs(batch_size)
        assert len(grid) == 5
        assert namespace["lr_grid"](batch_size) == (grid[::2] if quick == "1" else grid)
