"""The results store: ``DIR/runs.jsonl`` plus one ``DIR/curves/<group_id>.npz`` per group.

Crash safety (``kill -9`` at any moment):

- a group's curves file is written to a temporary file, fsynced and renamed into place *before*
  any record that points to it is appended, so every record's curves exist;
- each record is a whole line written to a file opened for appending (the rest written again
  when ``os.write`` writes only part of it), then fsynced; a crash can only leave a torn last
  line without its newline, which the next writer removes;
- a run is done exactly when its record is in ``runs.jsonl``; resuming recomputes a group that
  lacks any record (training is deterministic) and appends only the missing records.

One process writes a DIR at a time: :class:`ResultStore` holds an exclusive ``flock`` on
``DIR/.lock`` and refuses to open a DIR that another process holds; so do the main job and the
other commands that write into a DIR (``quadratic``, ``nqm`` and ``baselines``, through
:class:`DirectoryLock`). The report has a lock of its own (:func:`experiments.report.locked`).
Readers (:func:`read_runs`, :func:`load_curves`) take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:  # the store itself needs no jax
    from experiments.train import GroupResult

RUNS_FILE = "runs.jsonl"
CURVES_DIR = "curves"
LOCK_FILE = ".lock"


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if there is none.

    Raises:
      ValueError: naming ``path``, if it is not valid JSON (cut short or edited by hand).
    """
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None


def _naming(path: Path, error: OSError) -> OSError:
    """``error`` naming ``path``, the file being written: a full disk's write or fsync names no
    file, and a refused temporary file names that hidden file, not the one the user knows."""
    if error.errno is None or error.filename == str(path):
        return error
    return OSError(error.errno, error.strerror, str(path))  # the errno's subclass, as raised


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` atomically: a crash leaves the old file or the new one, never half of one.

    Raises:
      OSError: what the file system refused (a full or read-only disk), naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _naming(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are for sharing
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _naming(path, e) from e
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as JSON atomically (:func:`write_bytes`)."""
    write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def write_json_and_figure(
    out_dir: str | os.PathLike[str], stem: str, obj: Any, plot: Callable[[BinaryIO], None]
) -> None:
    """Writes ``out_dir/stem.json`` and ``out_dir/stem.png``, which ``plot`` draws, each atomically.

    The figure is drawn (a second or so) before anything is written: a Ctrl-C meanwhile leaves
    nothing behind. A folder in the place of either file is refused before either is written.
    """
    figure = io.BytesIO()
    plot(figure)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = out / f"{stem}.json", out / f"{stem}.png"
    for target in targets:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    write_json(targets[0], obj)
    write_bytes(targets[1], figure.getvalue())


class StoreLockedError(RuntimeError):
    """Another process is writing the same results directory."""


class CorruptStoreError(ValueError):
    """``runs.jsonl`` has a line, other than a torn last one, that is not a run's record."""


ADVICE = "wait for it or use another --out"  # the end of StoreLockedError's message


def lock_directory(
    root: Path, advice: str = ADVICE, name: str = LOCK_FILE, wait: bool = False
) -> int:
    """Takes the exclusive ``flock`` on ``root/name`` (``root/.lock``); returns its descriptor.

    Closing the descriptor releases the lock, and so does the process's end, however it ends: a
    killed writer leaves no stale lock behind. ``advice`` ends the error's message; with ``wait``,
    another process's lock is waited for instead.

    Raises:
      StoreLockedError: if another process holds it (and not ``wait``).
    """
    while True:
        fd = os.open(root / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            # A holder that made the file removes it when it fails (DirectoryLock, ResultStore):
            # the lock of a file no longer in place is no lock, as a process that opens the
            # new one gets it too. Then this one is taken afresh.
            if os.path.samestat(os.fstat(fd), os.stat(root / name)):
                return fd
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{str(root)!r} is in use by another process (it holds {str(root / name)!r}); "
                f"{advice}."
            ) from None
        except FileNotFoundError:
            pass
        except BaseException:  # a Ctrl-C while waiting
            os.close(fd)
            raise
        os.close(fd)


def remove_leftovers(root: Path, names: Iterable[str]) -> None:
    """Removes the hidden temporary files of :func:`write_bytes` that a killed writer left beside
    the files ``names`` (relative to ``root``): ``.NAME.*.tmp``, never read, never renamed into
    place. Call it only holding ``root``'s lock: another writer's may be in use."""
    for name in names:
        path = root / name
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


class DirectoryLock:
    """``root``'s lock (:func:`lock_directory`) held by a writer other than a :class:`ResultStore`
    (the commands that write into a DIR, and the report under a lock of its own); use it as a
    context manager.

    Args:
      root: The directory; made if missing, with its parents.
      writes: The files (relative to ``root``) the writer writes: the temporary files that a killed
        writer left beside them are removed once the lock is held (:func:`remove_leftovers`).
      advice: The end of the error's message if the lock is held (:func:`lock_directory`).
      name: The lock file's name in ``root``.
      wait: Whether to wait for another process's lock instead of refusing.
      make: Whether to make a missing ``root`` at once; if not, :meth:`hold` makes it and takes its
        lock, before the first write (a writer killed before then leaves nothing behind).

    If the block raises (an error, a Ctrl-C), what was made for the lock is removed again: the lock
    file, and the directories if they are left empty; what the block wrote is kept.

    Raises:
      StoreLockedError: if another process holds the lock.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        writes: Iterable[str] = (),
        advice: str = ADVICE,
        name: str = LOCK_FILE,
        wait: bool = False,
        make: bool = True,
    ):
        self.root = Path(root)
        self._writes, self._advice, self._name, self._wait = list(writes), advice, name, wait
        self._lock: int | None = None
        self._made: list[Path] = []
        self._made_lock = False
        if make or self.root.exists():
            self.hold()

    def hold(self) -> None:
        """Takes the lock, making ``root`` if missing; nothing if it is held already.

        Raises:
          StoreLockedError: if another process holds the lock.
        """
        if self._lock is not None:
            return
        # Not a `..` of the path (`new/..` is new's parent): the folder before it is made instead.
        self._made = [
            p for p in (self.root, *self.root.parents) if p.name != ".." and not p.exists()
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        self._made_lock = not (self.root / self._name).exists()
        try:
            self._lock = lock_directory(self.root, self._advice, self._name, self._wait)
        except StoreLockedError:
            raise  # the lock file is the other process's (and DIR is not empty)
        except BaseException:
            self._undo()
            raise
        try:
            remove_leftovers(self.root, self._writes)
        except BaseException:
            self.__exit__(BaseException)
            raise

    def _undo(self) -> None:
        if self._made_lock:
            (self.root / self._name).unlink(missing_ok=True)
        for path in self._made:  # the deepest first
            try:
                path.rmdir()
            except OSError:  # no longer empty (or another process's now): kept
                break

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if self._lock is None:
            return
        try:
            if exc_type is not None:
                self._undo()  # removed while still held
        finally:
            os.close(self._lock)
            self._lock = None


def _parse_lines(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parses the JSON lines of ``runs.jsonl``; returns the records and the valid prefix length.

    Text after the last newline is a torn write and is dropped, and so is a last line that is not
    valid JSON (what a crash of the file system rather than of the process can leave).
    """
    *complete, _torn = data.split(b"\n")
    records, valid = [], 0
    for number, line in enumerate(complete, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not _is_record(record):
            if number == len(complete) and record is None:
                break
            raise CorruptStoreError(
                f"corrupt record on line {number} of {str(path)!r}; move the file away to start "
                "afresh, or delete that line to recompute its run."
            )
        records.append(record)
        valid += len(line) + 1
    return records, valid


def _is_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("run_id"), str)
        and isinstance(record.get("curves"), str)
        and type(record.get("curve_index")) is int  # not a bool (true would read row 1)
    )


def read_runs(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads every complete record of ``DIR/runs.jsonl`` (a torn last line is ignored).

    Args:
      root: The results directory.

    Returns:
      The records in the order they were written; empty if there is no ``runs.jsonl``.

    Raises:
      CorruptStoreError: if a line other than a torn last one is not a run's record.
    """
    path = Path(root) / RUNS_FILE
    if not path.exists():
        return []
    return _parse_lines(path.read_bytes(), path)[0]


def read_curves_file(root: str | os.PathLike[str], name: str) -> dict[str, np.ndarray]:
    """Every array of the curves file ``name`` (relative to ``root``), read whole.

    Raises:
      CorruptStoreError: naming the file, if it is missing or cannot be read whole (truncated,
        emptied, not an ``.npz``, a failed CRC).
    """
    try:
        # Opened here: np.load leaves a file it opened itself open when it is not a zip.
        with open(Path(root) / name, "rb") as f, np.load(f, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}  # reading checks each CRC
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = e if isinstance(e, OSError | zipfile.BadZipFile) else "not an .npz of curves"
        raise CorruptStoreError(
            f"{str(root)!r} has an unreadable curves file ({name}: {why}); move the directory "
            "away to start afresh."
        ) from None


def load_curves(root: str | os.PathLike[str], record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Loads one run's curves from its group's ``.npz`` file.

    Args:
      root: The results directory.
      record: A record from :func:`read_runs`.

    Returns:
      ``batch_loss`` and ``grad_norm`` ``[steps]``, ``eval_steps`` ``[E]``, and ``train_loss``,
      ``test_loss``, ``test_accuracy`` ``[E]`` of that run.

    Raises:
      ValueError: if the file has no such row, or its row holds another run.
      OSError: if the file cannot be read (FileNotFoundError if it is missing).
    """
    with np.load(Path(root) / record["curves"]) as npz:
        row, run_ids = record["curve_index"], npz["run_ids"]
        # Not an IndexError for a row past the end, nor the last row for -1.
        if not 0 <= row < len(run_ids) or str(run_ids[row]) != record["run_id"]:
            raise ValueError(f"curves of run_id={record['run_id']!r} not found at row {row}.")
        curves = {k: npz[k][row] for k in ("batch_loss", "grad_norm", "train_loss", "test_loss")}
        curves["test_accuracy"] = npz["test_accuracy"][row]
        curves["eval_steps"] = npz["eval_steps"]
    return curves


class ResultStore:
    """The single writer of one results directory; use it as a context manager.

    Args:
      root: The results directory; created if missing.

    Raises:
      StoreLockedError: if another process has the directory open.
      CorruptStoreError: if ``runs.jsonl`` has a corrupt line before its last, or a record's
        curves file is missing, unreadable or holds another run in the record's row.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / LOCK_FILE
        made_lock = not lock_path.exists()
        self._lock = lock_directory(self.root)
        try:
            self._open()
        except BaseException:
            # A store refused (damaged, or blocked by what the file system refuses) is left as it
            # was: the lock file goes too if this made it (removed while still held).
            if made_lock:
                lock_path.unlink(missing_ok=True)
            os.close(self._lock)
            raise

    def _open(self) -> None:
        path = self.root / RUNS_FILE
        data = path.read_bytes() if path.exists() else b""
        self._records, valid = _parse_lines(data, path)
        # Every record's curves file is written before the record, so a missing one was removed
        # by hand: refused here rather than failing later in a report.
        lost = sorted({r["curves"] for r in self._records} - {
            f"{CURVES_DIR}/{p.name}" for p in (self.root / CURVES_DIR).glob("*.npz")
        })  # fmt: skip
        if lost:
            raise CorruptStoreError(
                f"{str(self.root)!r} has records whose curves file is missing ({lost[0]}"
                f"{f' and {len(lost) - 1} more' if len(lost) > 1 else ''}); move the directory "
                "away to start afresh."
            )
        self._check_curves()
        self._done = {r["run_id"] for r in self._records}
        (self.root / CURVES_DIR).mkdir(exist_ok=True)  # once the store is known to be sound
        self._runs = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if valid < len(data):
                os.ftruncate(self._runs, valid)
                os.fsync(self._runs)
            for leftover in (self.root / CURVES_DIR).glob("*.tmp"):
                leftover.unlink()  # from a crash during a curves write; never referenced
        except BaseException:
            os.close(self._runs)
            raise

    def _check_curves(self) -> None:
        """Refuses a store whose curves files cannot be read whole (truncated or emptied by hand,
        or by a disk fault), or whose row of a record holds another run: otherwise a resumed sweep
        would count those runs as done and only a report would fail, later."""
        run_ids = {}
        for name in sorted({r["curves"] for r in self._records}):
            arrays = read_curves_file(self.root, name)
            if "run_ids" not in arrays:
                raise CorruptStoreError(
                    f"{str(self.root)!r} has an unreadable curves file ({name}: not an .npz of "
                    "curves); move the directory away to start afresh."
                )
            run_ids[name] = [str(run_id) for run_id in arrays["run_ids"]]
        for record in self._records:
            rows, index = run_ids[record["curves"]], record["curve_index"]
            if not (0 <= index < len(rows) and rows[index] == record["run_id"]):
                raise CorruptStoreError(
                    f"{str(self.root)!r} has a record whose row {index} of {record['curves']} "
                    f"holds another run (run_id={record['run_id']!r}); move the directory away "
                    "to start afresh."
                )

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the files and releases the lock."""
        os.close(self._runs)
        os.close(self._lock)  # closing the descriptor releases the flock

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record in the store, in the order written."""
        return list(self._records)

    def missing(self, run_ids: Iterable[str]) -> list[str]:
        """The given run ids that have no record yet."""
        return [run_id for run_id in run_ids if run_id not in self._done]

    def add_group(self, result: GroupResult) -> list[dict[str, Any]]:
        """Stores a group: writes its curves file, then appends the records not yet stored.

        Args:
          result: The group from :func:`experiments.train.run_group`.

        Returns:
          The records appended.
        """
        curves = f"{CURVES_DIR}/{result.group_id}.npz"
        self._write_npz_atomically(self.root / curves, result.curves())
        added = []
        for index, run in enumerate(result.runs):
            if run.run_id in self._done:
                continue
            record = {**run.as_record(), "curves": curves, "curve_index": index}
            line = (json.dumps(record, allow_nan=False) + "\n").encode()
            self._append(line)
            self._records.append(record)
            self._done.add(run.run_id)
            added.append(record)
        return added

    def _append(self, line: bytes) -> None:
        """Appends ``line`` whole, then fsyncs: ``os.write`` may write only part of it (as on a
        full disk), and a record glued to the rest of a torn one would corrupt the file. If that
        fails, the file is cut back to where it was, so a later record does not follow a torn one.
        """
        end = os.lseek(self._runs, 0, os.SEEK_END)
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._runs, view) :]
            os.fsync(self._runs)
        except BaseException as e:
            os.ftruncate(self._runs, end)
            if isinstance(e, OSError):
                raise _naming(self.root / RUNS_FILE, e) from e
            raise

    def _write_npz_atomically(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(path, buffer.getvalue())
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
