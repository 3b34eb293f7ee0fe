"""Tests of experiments.store on hand-made groups: torn lines, leftovers, curve rows, duplicates."""

import contextlib
import dataclasses
import errno
import json
import os

import numpy as np
import pytest

from experiments import store, train

STEPS, EVAL_STEPS = 4, (2, 4)


def make_group(lrs, seeds=(0,), batch_size=16, beta=0.0):
    """A GroupResult as run_group would return it, with distinct made-up curves per run."""
    spec = train.GroupSpec("digits", "mlp", batch_size, beta, STEPS, 2)
    grid = [(lr, seed) for lr in lrs for seed in seeds]
    runs = tuple(
        train.RunResult(
            run_id=spec.run_id(lr, seed, None),
            dataset="digits",
            model="mlp",
            batch_size=batch_size,
            beta=beta,
            lr=lr,
            seed=seed,
            steps=STEPS,
            eval_every=2,
            target_loss=None,
            final_train_loss=lr,
            final_test_loss=lr,
            final_test_accuracy=0.5,
            steps_to_target=None,
            diverged=False,
            diverged_at=None,
            wall_seconds=1.0,
        )
        for lr, seed in grid
    )
    rows = np.arange(len(grid), dtype=np.float32)[:, None]
    return train.GroupResult(
        spec=spec,
        runs=runs,
        batch_loss=rows + np.zeros((1, STEPS), np.float32),
        grad_norm=rows + 10 + np.zeros((1, STEPS), np.float32),
        eval_steps=np.asarray(EVAL_STEPS),
        train_loss=rows + np.zeros((1, len(EVAL_STEPS)), np.float32),
        test_loss=rows + np.zeros((1, len(EVAL_STEPS)), np.float32),
        test_accuracy=np.full((len(grid), len(EVAL_STEPS)), 0.5, np.float32),
        wall_seconds=1.0,
    )


def test_complete_but_invalid_last_line_is_dropped_and_removed(tmp_path):
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1, 0.2]))
    runs = tmp_path / store.RUNS_FILE
    good = runs.read_bytes()
    assert good.count(b"\n") == 2
    runs.write_bytes(good + b'{"run_id": "bad\n')  # has its newline, yet is not JSON

    expected = [r["run_id"] for r in json_lines(good)]
    assert [r["run_id"] for r in store.read_runs(tmp_path)] == expected
    with store.ResultStore(tmp_path) as s:
        assert [r["run_id"] for r in s.records] == expected
        assert s.missing(expected) == []
    assert runs.read_bytes() == good  # the writer truncated the bad line away

    # Only the last line gets that leniency: the same bad line earlier is corruption.
    runs.write_bytes(b'{"run_id": "bad\n' + good)
    with pytest.raises(ValueError, match="line 1"):
        store.read_runs(tmp_path)
    with pytest.raises(ValueError, match="line 1"):
        store.ResultStore(tmp_path)


def json_lines(data):
    return [json.loads(line) for line in data.splitlines()]


def test_leftover_tmp_curves_are_removed_on_open(tmp_path):
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1]))
    curves = tmp_path / store.CURVES_DIR
    kept = sorted(p.name for p in curves.iterdir())
    assert len(kept) == 1 and kept[0].endswith(".npz")
    (curves / "abc123.tmp").write_bytes(b"half an npz")
    (curves / "def456xyz.tmp").write_bytes(b"")
    with store.ResultStore(tmp_path):
        assert sorted(p.name for p in curves.iterdir()) == kept
    record = store.read_runs(tmp_path)[0]
    assert store.load_curves(tmp_path, record)["batch_loss"].tolist() == [0.0] * STEPS


def test_load_curves_rejects_a_row_of_another_run(tmp_path):
    with store.ResultStore(tmp_path) as s:
        first, second = s.add_group(make_group([0.1, 0.2]))
    assert first["curve_index"] == 0 and second["curve_index"] == 1
    assert store.load_curves(tmp_path, second)["grad_norm"].tolist() == [11.0] * STEPS
    with pytest.raises(ValueError, match="not found at row 1"):
        store.load_curves(tmp_path, {**first, "curve_index": 1})
    with pytest.raises(ValueError, match="not found at row 0"):
        store.load_curves(tmp_path, {**second, "curve_index": 0})
    # A row past the end was an IndexError; row -1 read the last row.
    with pytest.raises(ValueError, match="not found at row 2"):
        store.load_curves(tmp_path, {**second, "curve_index": 2})
    with pytest.raises(ValueError, match="not found at row -1"):
        store.load_curves(tmp_path, {**second, "curve_index": -1})


def test_add_group_skips_runs_already_stored(tmp_path):
    one, two = make_group([0.1]), make_group([0.1, 0.2])
    stored = one.runs[0].run_id
    assert two.runs[0].run_id == stored and two.group_id != one.group_id
    with store.ResultStore(tmp_path) as s:
        assert [r["run_id"] for r in s.add_group(one)] == [stored]
        added = s.add_group(two)
        assert [r["run_id"] for r in added] == [two.runs[1].run_id]
        assert added[0]["curve_index"] == 1
        assert [r["run_id"] for r in s.records] == [stored, two.runs[1].run_id]
        assert s.add_group(two) == []  # everything already stored
    ids = [r["run_id"] for r in json_lines((tmp_path / store.RUNS_FILE).read_bytes())]
    assert ids == [stored, two.runs[1].run_id]
    # Each record still finds its own row (in the curves file of the group that stored it).
    for r in store.read_runs(tmp_path):
        store.load_curves(tmp_path, r)
    # A reopened store knows what is done, too.
    with store.ResultStore(tmp_path) as s:
        assert s.add_group(two) == []
    assert len(store.read_runs(tmp_path)) == 2


def test_a_short_write_does_not_tear_a_record(tmp_path, monkeypatch):
    # os.write may write only part of a line (as on a full disk); the rest must follow it, or the
    # next record is glued to a torn one in the middle of the file.
    write = store.os.write
    monkeypatch.setattr(store.os, "write", lambda fd, data: write(fd, bytes(data[:7])))
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1, 0.2]))
        s.add_group(make_group([0.3], batch_size=32))
    monkeypatch.undo()
    assert [r["lr"] for r in store.read_runs(tmp_path)] == [0.1, 0.2, 0.3]
    with store.ResultStore(tmp_path) as s:
        assert len(s.records) == 3


@pytest.mark.parametrize(
    "damage", ["truncated", "empty", "bit flip", "not a zip", "no run_ids", "rows swapped"]
)
def test_an_unreadable_or_mismatched_curves_file_is_refused(damage, tmp_path):
    # kill -9 cannot do this (curves are renamed into place whole), a disk fault or a hand can;
    # accepting it would count the runs as done and fail only in a report, later.
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1, 0.2]))
    (npz,) = (tmp_path / store.CURVES_DIR).glob("*.npz")
    data = npz.read_bytes()
    if damage == "rows swapped":
        arrays = dict(np.load(npz))
        np.savez(npz, **{**arrays, "run_ids": arrays["run_ids"][::-1]})
        match = "row 0 of curves/.* holds another run"
    elif damage == "no run_ids":
        arrays = dict(np.load(npz))
        np.savez(npz, **{k: v for k, v in arrays.items() if k != "run_ids"})
        match = f"unreadable curves file \\(curves/{npz.name}: not an .npz of curves"
    else:
        npz.write_bytes(
            {
                "truncated": data[: len(data) // 2],
                "empty": b"",
                "bit flip": data[:200] + bytes([data[200] ^ 1]) + data[201:],
                "not a zip": b"not an npz",  # np.load reads it as a pickle: a ValueError
            }[damage]
        )
        match = f"unreadable curves file \\(curves/{npz.name}: "
    with pytest.raises(store.CorruptStoreError, match=match):
        store.ResultStore(tmp_path)
    os.close(store.lock_directory(tmp_path))  # the refused store let go of its lock


def test_a_failed_append_leaves_no_torn_line_behind(tmp_path, monkeypatch):
    # A full disk: part of the line is written, then ENOSPC. A caller that goes on with the same
    # store (after freeing space) must not glue its next record to the torn one.
    write, calls = store.os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, bytes(data[:7]))

    with store.ResultStore(tmp_path) as s:
        monkeypatch.setattr(store.os, "write", full_disk)
        # The error names the file: a write's own error names none.
        with pytest.raises(OSError, match=f"No space.*{tmp_path / store.RUNS_FILE}") as raised:
            s.add_group(make_group([0.1]))
        assert raised.value.errno == errno.ENOSPC
        monkeypatch.undo()
        assert s.records == []
        s.add_group(make_group([0.2], batch_size=32))
    assert [r["lr"] for r in store.read_runs(tmp_path)] == [0.2]


@pytest.mark.parametrize("blocked", ["json", "png"])
def test_json_and_figure_with_a_folder_in_the_way_writes_neither(blocked, tmp_path):
    # quadratic and nqm: with a folder named quadratic.png, quadratic.json was replaced, and then
    # the figure failed with "Is a directory".
    (tmp_path / "r.json").write_text('{"old": 1}\n')
    (tmp_path / f"r.{blocked}").unlink(missing_ok=True)
    (tmp_path / f"r.{blocked}").mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(IsADirectoryError):
        store.write_json_and_figure(tmp_path, "r", {"new": 2}, lambda f: f.write(b"png"))
    assert sorted(os.listdir(tmp_path)) == before
    if blocked == "png":
        assert (tmp_path / "r.json").read_text() == '{"old": 1}\n'


def test_json_and_figure_are_written_whole(tmp_path):
    store.write_json_and_figure(tmp_path, "r", {"a": [1.5]}, lambda f: f.write(b"\x89PNG"))
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1.5]}
    assert (tmp_path / "r.png").read_bytes() == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.png"]
    assert oct((tmp_path / "r.png").stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("fails", ["fsync", "mkstemp"])
def test_a_refused_write_names_the_file_being_written(fails, tmp_path, monkeypatch):
    # A full disk's fsync names no file ("error: [Errno 28] No space left on device"), and a
    # read-only folder's refused temporary file is the hidden .report.md.xxxx.tmp: the CLI's one
    # error line named neither the file nor the folder.
    target = tmp_path / "report.md"

    def refused(*args, **kwargs):
        if fails == "fsync":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise PermissionError(
            errno.EROFS, "Read-only file system", str(tmp_path / ".report.md.x.tmp")
        )

    monkeypatch.setattr(store.os if fails == "fsync" else store.tempfile, fails, refused)
    with pytest.raises(OSError) as raised:
        store.write_bytes(target, b"text")
    assert raised.value.filename == str(target)
    assert raised.value.errno == (errno.ENOSPC if fails == "fsync" else errno.EROFS)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # no temporary file left behind


@pytest.mark.parametrize(
    "bad",
    [
        b'{"run_id": "x", "curves": "curves/g.npz"}',  # no curve_index
        b'{"run_id": "x", "curves": "curves/g.npz", "curve_index": "0"}',
        b'{"run_id": "x", "curves": "curves/g.npz", "curve_index": 0.0}',
        b'["x", "curves/g.npz", 0]',
    ],
)
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_line_of_valid_json_that_is_not_a_record_is_corruption(bad, where, tmp_path):
    # Only a last line that is not JSON at all is taken for a crash's leftover and dropped: valid
    # JSON was written whole (or edited by hand), and dropping it would recompute a run silently.
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1, 0.2]))
    runs = tmp_path / store.RUNS_FILE
    good = runs.read_bytes()
    runs.write_bytes(bad + b"\n" + good if where == "first" else good + bad + b"\n")
    line = 1 if where == "first" else 3
    with pytest.raises(store.CorruptStoreError, match=f"corrupt record on line {line} "):
        store.read_runs(tmp_path)
    with pytest.raises(store.CorruptStoreError, match=f"corrupt record on line {line} "):
        store.ResultStore(tmp_path)


def test_a_negative_curve_index_is_refused(tmp_path):
    # Row -1 is the last row to numpy: it holds this very run, yet the record names no row.
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1, 0.2]))
    runs = tmp_path / store.RUNS_FILE
    first, second = json_lines(runs.read_bytes())
    second["curve_index"] = -1
    runs.write_text("".join(json.dumps(r) + "\n" for r in (first, second)))
    with pytest.raises(store.CorruptStoreError, match=r"row -1 of curves/.* holds another run"):
        store.ResultStore(tmp_path)


def test_curves_files_are_readable_by_others(tmp_path):
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1]))
    (npz,) = (tmp_path / store.CURVES_DIR).glob("*.npz")
    assert oct(npz.stat().st_mode & 0o777) == "0o644"  # mkstemp's 0o600 is private


def test_a_failed_write_json_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text('{"old": 1}\n')

    def fail(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store.os, "replace", fail)
    with pytest.raises(OSError, match="I/O error"):
        store.write_json(tmp_path / "r.json", {"new": 2})
    assert os.listdir(tmp_path) == ["r.json"]
    assert (tmp_path / "r.json").read_text() == '{"old": 1}\n'


def test_nan_is_refused_not_written_as_json(tmp_path):
    # Strict JSON: a NaN (not JSON; jq and JavaScript refuse it) is a ValueError, nothing written.
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        store.write_json(tmp_path / "r.json", {"loss": float("nan")})
    assert os.listdir(tmp_path) == []
    group = make_group([0.1])
    group = dataclasses.replace(
        group, runs=(dataclasses.replace(group.runs[0], final_train_loss=float("nan")),)
    )
    with store.ResultStore(tmp_path) as s:
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            s.add_group(group)
        assert s.records == [] and s.missing([group.runs[0].run_id]) != []
    assert (tmp_path / store.RUNS_FILE).read_bytes() == b""


def test_files_are_fsynced_before_they_are_renamed_or_referenced(tmp_path, monkeypatch):
    # The crash-safety order of the module's docstring: a curves file is fsynced, renamed into
    # place and its folder fsynced before any record pointing to it is written; each record is
    # fsynced once written. write_json fsyncs its temporary file before renaming it into place.
    events = []

    def name(fd):
        path = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path)
        return "*.tmp" if path.endswith(".tmp") else path

    def logged(what, call, named):
        def wrapper(*args):
            events.append((what, named(*args)))
            return call(*args)

        return wrapper

    rel = lambda src, dst: os.path.relpath(dst, tmp_path)
    with store.ResultStore(tmp_path) as s:
        monkeypatch.setattr(store.os, "fsync", logged("fsync", os.fsync, name))
        monkeypatch.setattr(store.os, "write", logged("write", os.write, lambda fd, _: name(fd)))
        monkeypatch.setattr(store.os, "replace", logged("replace", os.replace, rel))
        group = make_group([0.1, 0.2])
        s.add_group(group)
        store.write_json(tmp_path / "r.json", {"a": 1})
    npz, runs = f"{store.CURVES_DIR}/{group.group_id}.npz", store.RUNS_FILE
    assert events == [
        ("fsync", "*.tmp"),
        ("replace", npz),
        ("fsync", store.CURVES_DIR),
        *[("write", runs), ("fsync", runs)] * 2,
        ("fsync", "*.tmp"),
        ("replace", "r.json"),
    ]


def test_a_bool_curve_index_is_a_corrupt_record(tmp_path):
    # JSON true is a Python bool, an int subclass: it was taken as row 1.
    with store.ResultStore(tmp_path) as s:
        s.add_group(make_group([0.1, 0.2]))
    runs = tmp_path / store.RUNS_FILE
    first, second = json_lines(runs.read_bytes())
    second["curve_index"] = True
    runs.write_text("".join(json.dumps(r) + "\n" for r in (first, second)))
    with pytest.raises(store.CorruptStoreError, match="corrupt record on line 2 "):
        store.read_runs(tmp_path)


def test_a_lock_waited_for_is_the_one_in_place_after_its_holder_removes_its_file(tmp_path):
    # A holder that made the lock file removes it when its block fails (a Ctrl-C of `report DIR`):
    # the main job, waiting with that file open, got the lock of a file no longer in DIR, and a
    # second `report DIR` then made a new one and held it too: two reports of DIR at once.
    import threading

    opened = threading.Event()
    flock = store.fcntl.flock

    def flock_after_open(fd, operation):
        opened.set()  # the waiter's descriptor is open on the holder's file
        return flock(fd, operation)

    held = store.DirectoryLock(tmp_path, name=".report.lock")
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(store.lock_directory(tmp_path, name=".report.lock", wait=True))
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.fcntl, "flock", flock_after_open)
        waiter.start()
        assert opened.wait(10)
    with pytest.raises(KeyboardInterrupt), held:
        raise KeyboardInterrupt
    waiter.join(10)
    try:
        with pytest.raises(store.StoreLockedError):
            os.close(store.lock_directory(tmp_path, name=".report.lock"))
    finally:
        os.close(got.pop())


@pytest.mark.parametrize("root", ["new/../out", "new/deeper/../../out", "new/out"])
def test_a_failed_lock_block_removes_the_directories_it_made(root, tmp_path, monkeypatch):
    # DIR given with `..` (`--out new/../out`): mkdir made new/ and out/, and a failed block
    # (a full disk, a Ctrl-C) removed out/ alone, stopping at new/.. (not empty: the parent).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    with pytest.raises(KeyboardInterrupt), store.DirectoryLock(root):
        assert (tmp_path / "new").is_dir()
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def _held(root):
    """Whether another descriptor (as another process) is refused ``root``'s lock."""
    try:
        os.close(store.lock_directory(root))
    except store.StoreLockedError:
        return True
    return False


def test_a_directory_lock_makes_its_directory_and_removes_it_again_if_the_block_fails(tmp_path):
    root = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), store.DirectoryLock(root):
        assert _held(root)
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == []  # the lock file and both folders
    # What the block wrote is kept, and so is the folder it is in; only the lock file goes.
    with pytest.raises(RuntimeError), store.DirectoryLock(root):
        (root / "results.json").write_text("{}")
        raise RuntimeError
    assert [p.name for p in root.iterdir()] == ["results.json"]
    with store.DirectoryLock(root):
        assert _held(root)
    assert not _held(root)
    assert sorted(p.name for p in root.iterdir()) == [store.LOCK_FILE, "results.json"]


def test_a_failed_block_keeps_the_lock_file_it_did_not_make(tmp_path):
    # DIR/.lock of an earlier job (another process may be waiting on it): not the lock's to remove.
    os.close(store.lock_directory(tmp_path))
    with pytest.raises(RuntimeError), store.DirectoryLock(tmp_path):
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == [store.LOCK_FILE]


@pytest.mark.parametrize("where", ["flock", "remove_leftovers"])
def test_a_ctrl_c_while_a_directory_lock_is_taken_leaves_nothing(where, tmp_path, monkeypatch):
    # A Ctrl-C while waiting for the lock (or an error while the leftovers are removed): the folder
    # and the lock file it made are removed again, and the descriptor is closed, lock released.
    root = tmp_path / "new"
    lock_file = str(root / store.LOCK_FILE)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.fcntl if where == "flock" else store, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.DirectoryLock(root, ["results.json"], wait=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == []
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor of the listing itself
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [f for f in open_files if f.startswith(lock_file)]


def test_a_lock_the_file_system_refuses_is_not_reported_as_another_processs(tmp_path, monkeypatch):
    # flock fails on some network file systems (ENOLCK): that error, not "in use by another
    # process; wait for it", which no waiting would cure.
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="No locks available") as raised:
        store.lock_directory(tmp_path)
    assert not isinstance(raised.value, store.StoreLockedError)
