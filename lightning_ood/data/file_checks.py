"""Per-file data checks run once and remembered on disk: shared by the ``imglist`` and ``imagefolder`` sources.

A check such as "every file is an image PIL can decode" costs a read (and a decode) of every file: at ImageNet
scale, minutes per node. :func:`checked_problems` runs it at most once per set and content:

1. the caller derives a ``key`` from what decides the answer (for an image list, the list's content hash; for an
   image folder, the ordered paths, sizes and modification times of its files: :func:`listing_key`) and the
   cache file is ``$LIGHTNING_OOD_CACHE/file_checks/<key>.json`` (:func:`checks_dir`);
2. when that file holds a result for exactly this key, it is the answer: nothing is opened. A cache file that
   is unreadable, truncated, of another key or format, or whose rows do not fit the set, is ignored (never
   trusted) and written again;
3. otherwise the files are checked in a pool of threads (PIL releases the GIL while decoding), with a progress
   bar on rank 0 for long checks. With ``collective=True`` (every rank calls it at the same point, e.g. in
   ``setup``) each rank checks only its share (rows ``r, r + W, ...``) and the shares are all-gathered; with
   ``collective=False`` (``prepare_data``: local rank 0 of each node only) the caller checks every file;
4. the result (the failing rows and why) is written atomically (a temporary file, then :func:`os.replace`), so
   a crash never leaves a partial cache; a failure to write is a warning.

So a run whose ``prepare_data`` checked a set, and every later start, only lists the files on each rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from tqdm.auto import tqdm

from lightning_ood.distributed import all_gather_objects, distributed_world

#: A progress bar is shown (on rank 0) when its share has at least this many files to check or hash.
PROGRESS_MIN = 2000
#: Items handed to the thread pool at a time, and per task.
_CHUNK, _BLOCK = 4096, 32
_FORMAT = "lightning-ood file check v1"
T = TypeVar("T")
#: ``(row, reason)`` of each file that fails a check, rows ascending.
Problems = list[tuple[int, str]]


def cache_base() -> Path:
    """The folder lightning-ood remembers data checks in: ``$LIGHTNING_OOD_CACHE`` or ``~/.cache/lightning_ood``
    (on a cluster, point the variable at a file system every node mounts, so one node's work serves all)."""
    return Path(os.environ.get("LIGHTNING_OOD_CACHE") or Path.home() / ".cache" / "lightning_ood")


def checks_dir() -> Path:
    """Where check results are remembered: :func:`cache_base`, then ``file_checks``."""
    return cache_base() / "file_checks"


def threaded_map(fn: Callable[[int], T], items: np.ndarray | Sequence[int], workers: int) -> Iterator[T]:
    """``fn(i)`` for each of ``items``, in order, by ``workers`` threads: ``_BLOCK`` items per task (so a stat
    costs a stat, not a future), ``_CHUNK`` items in flight at a time (never a million futures at once)."""
    items = np.asarray(items, dtype=np.int64)

    def block(start: int) -> list[T]:
        return [fn(i) for i in items[start : start + _BLOCK].tolist()]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in range(0, len(items), _CHUNK):
            for values in pool.map(block, range(chunk, min(chunk + _CHUNK, len(items)), _BLOCK)):
                yield from values


def listing_key(what: str, paths: Sequence[str], size: np.ndarray, mtime_ns: np.ndarray) -> str:
    """A hex digest of a file listing: ``what`` (the check and anything else that decides its answer), then the
    ordered paths (absolute, so that the same relative names elsewhere are another set) with their sizes and
    modification times (int64 ``[N]`` each, ns). A new, removed, renamed or rewritten file changes it."""
    digest = hashlib.blake2b(f"{_FORMAT}\0{what}\0{len(paths)}\0".encode(), digest_size=20)
    for start in range(0, len(paths), 1 << 16):
        part = "\0".join(os.path.abspath(p) for p in paths[start : start + (1 << 16)])
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(np.ascontiguousarray(size, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(mtime_ns, dtype="<i8").tobytes())
    return digest.hexdigest()


def cache_file(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of ``key`` in ``cache_dir`` (default :func:`checks_dir`)."""
    return (Path(cache_dir) if cache_dir is not None else checks_dir()) / f"{key[:40]}.json"


def load_problems(path: Path, key: str, n: int | None) -> Problems | None:
    """The remembered result of the check ``key`` of ``n`` files (``None``: as many as it says, for a key that
    fixes the files, e.g. a list's content hash), or ``None`` (no such file, or one that is not a complete
    result of exactly this check: unreadable, truncated, another key or format, rows out of range)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data["format"] != _FORMAT or data["key"] != key or (n is not None and files != n):
            return None
        problems = [(int(row), str(reason)) for row, reason in data["problems"]]
        rows = [row for row, _ in problems]
        in_range = isinstance(files, int) and all(0 <= r < files for r in rows)
    except Exception:  # whatever is wrong with the file, it is not used
        return None
    return problems if in_range and rows == sorted(set(rows)) else None


def save_problems(path: Path, key: str, n: int, problems: Problems, where: str = "") -> None:
    """Write a result atomically (a temporary file in the same folder, then ``os.replace``); a failure to write
    is a warning (the next start checks again), not an error. ``where`` (e.g. the folder) is for a reader."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    record = {"format": _FORMAT, "key": key, "files": n, "where": where, "problems": problems}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        rank_zero_warn(
            f"file check of {where or 'a set'} not remembered ({error}); the next start checks again"
        )


def find_problems(
    files: Sequence[str | os.PathLike],
    problem: Callable[[str | os.PathLike], str | None],
    rows: np.ndarray | Sequence[int],
    workers: int,
    progress: str | None = None,
) -> Problems:
    """``(row, problem(files[row]))`` of each of ``rows`` whose ``problem`` is not ``None``, by ``workers``
    threads, with a progress bar titled ``progress`` (none when ``None`` or under :data:`PROGRESS_MIN` rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    show = progress is not None and len(rows) >= PROGRESS_MIN
    found: Problems = []
    with tqdm(total=len(rows), desc=progress, disable=not show, leave=False, unit="file") as bar:
        for row, reason in zip(
            rows.tolist(), threaded_map(lambda i: problem(files[i]), rows, workers), strict=True
        ):
            if reason is not None:
                found.append((row, reason))
            bar.update()
    return found


def checked_problems(
    files: Sequence[str | os.PathLike],
    problem: Callable[[str | os.PathLike], str | None],
    key: str,
    *,
    collective: bool,
    remember_failures: bool = True,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    what: str = "files",
) -> tuple[Problems, bool]:
    """``(problems, checked)``: the files failing ``problem`` (``(row, reason)``, rows ascending) and whether
    any file was checked by this call (``False``: the remembered result of ``key`` was used); see the module
    docstring.

    Args:
        files: the N files of the set.
        problem: ``problem(file)`` -> why the file fails the check, or ``None``.
        key: what decides the answer (e.g. :func:`listing_key`); names the cache file.
        collective: every rank calls this at the same point (e.g. ``setup``): rank 0 reads the cache and each
            rank checks its share; fails on every rank when the ranks' keys differ (they list other files).
            ``False``: no collective (``prepare_data``, which only local rank 0 runs), every file checked here.
        remember_failures: remember a result with problems too (only when ``key`` changes when a file is fixed,
            as a listing's sizes and times do; an image list's content hash does not).
        cache_dir: folder of the cache files (default :func:`checks_dir`).
        workers: threads per rank (default: the CPU count, at most 16).
        what: names the set in the progress bar, errors and warnings.
    """
    n, (rank, world) = len(files), distributed_world()
    share, shares = (rank, world) if collective else (0, 1)  # this caller's rows: share, share + shares, ...
    path = cache_file(key, cache_dir)
    if shares > 1:  # one collective: every rank's key, and rank 0's cache
        keys = all_gather_objects((key, load_problems(path, key, n) if rank == 0 else None))
        differ = [r for r, (other, _) in enumerate(keys) if other != keys[0][0]]
        if differ:
            raise RuntimeError(
                f"{what}: ranks {differ} list other files than rank 0 (files added, removed or rewritten while "
                "the run started, or a folder that is not the same on every node); make it the same everywhere"
            )
        cached = keys[0][1]
    else:
        cached = load_problems(path, key, n)
    if cached is not None:
        return cached, False
    threads = workers or min(16, os.cpu_count() or 1)
    rows = np.arange(share, n, shares)
    try:
        mine: tuple[bool, object] = (
            True,
            find_problems(files, problem, rows, threads, f"Checking {what}" if rank == 0 else None),
        )
    except Exception as error:  # raised on every rank, instead of the others waiting in the collective
        if shares == 1:
            raise
        mine = (False, f"rank {rank}: {type(error).__name__}: {error}")
    parts = all_gather_objects(mine) if shares > 1 else [mine]
    failed = [str(message) for ok, message in parts if not ok]
    if failed:
        raise OSError(f"cannot check the {what} ({n} files): " + "; ".join(failed))
    problems = sorted(found for _, found_share in parts for found in found_share)  # type: ignore[attr-defined]
    if share == 0 and (remember_failures or not problems):  # prepare_data: each node's local rank 0 writes
        save_problems(path, key, n, problems, what)
    return problems, True
