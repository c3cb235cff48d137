"""One 16-byte BLAKE2b digest per file of a set, computed once: split over the DDP ranks, remembered on disk.

The aux-vs-test content check (:mod:`lightning_ood.data.disjoint`) needs a digest of every file of the
auxiliary set and of every test set; at ImageNet scale that is hundreds of thousands of files. So that no rank
reads every file and no start reads them again, :func:`file_digests`:

1. finds the set's cache file (:func:`digest_cache_dir`, a name derived from the ordered paths and what is
   hashed) and reads it on rank 0, which broadcasts it (:func:`~lightning_ood.derived_state.rank_zero_decides`):
   the cache needs to be visible to rank 0 only, and a cache file that is unreadable, truncated or of another
   set is ignored (never trusted);
2. on each rank, for its share of the files (rows ``r, r + W, ...`` of ``W`` ranks) stats every file and
   takes the remembered digest of each whose path, size and modification time (ns) are unchanged; it hashes the
   others in a pool of threads (file reads, BLAKE2b and PIL decoding release the GIL), with a progress bar on
   rank 0;
3. all-gathers the shares (16-byte digests and two int64 per file: 32 MB for a million files, the only
   collective besides the broadcast) and, when anything was hashed, rank 0 writes the cache again, atomically
   (a temporary file, then :func:`os.replace`), so a crash never leaves a partial cache behind.

So the first start reads each file once, on one rank; later starts only stat the files (split over the ranks)
and read one cache file. A failure on any rank (a missing file) raises on every rank, naming it; none is left
waiting in the collective. Every rank must call :func:`file_digests` at the same point, with the same files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from tqdm.auto import tqdm

from lightning_ood.data.file_checks import PROGRESS_MIN, cache_base, threaded_map
from lightning_ood.derived_state import rank_zero_decides
from lightning_ood.distributed import all_gather_objects, distributed_world

#: Bytes per digest (BLAKE2b-128): a collision among 10^9 files has probability about 10^-21.
DIGEST_SIZE = 16
_FORMAT = "lightning-ood file digests v1"


def digest_cache_dir() -> Path:
    """Where file digests are remembered: ``$LIGHTNING_OOD_CACHE`` (default ``~/.cache/lightning_ood``), then
    ``file_digests``. On a cluster point the variable at a file system rank 0 of every run can read."""
    return cache_base() / "file_digests"


def bytes_digest(path: str | os.PathLike) -> bytes:
    """BLAKE2b-128 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


@dataclass(frozen=True)
class _Stats:
    """Per-file sizes and modification times (int64 ``[n]``) and digests (uint8 ``[n, 16]``)."""

    size: np.ndarray
    mtime_ns: np.ndarray
    digest: np.ndarray


def _cache_key(files: Sequence[str | os.PathLike], kind: str) -> str:
    """A hex digest of what the digests are of: ``kind`` and the ordered paths (with the working directory when
    a path is relative, since it then names another file elsewhere)."""
    paths = [os.fspath(f) for f in files]
    where = os.getcwd() if not all(os.path.isabs(p) for p in paths) else ""
    digest = hashlib.blake2b(f"{_FORMAT}\0{kind}\0{len(paths)}\0{where}\0".encode(), digest_size=20)
    for start in range(0, len(paths), 1 << 16):
        digest.update("\0".join(paths[start : start + (1 << 16)]).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _cache_path(directory: Path, key: str) -> Path:
    return directory / f"{key[:32]}.npz"


def _load(path: Path, key: str, n: int) -> _Stats | None:
    """The remembered digests of the set ``key`` of ``n`` files, or ``None`` (no such file, or one that is not
    a complete cache of exactly this set: unreadable, truncated, another set or format)."""
    try:
        with np.load(path, allow_pickle=False) as data:  # a damaged member fails its zip CRC when read
            if str(data["key"]) != key:
                return None
            stats = _Stats(data["size"], data["mtime_ns"], data["digest"])
    except Exception:  # whatever is wrong with the file, it is not used
        return None
    shapes_ok = stats.size.shape == stats.mtime_ns.shape == (n,) and stats.digest.shape == (n, DIGEST_SIZE)
    types_ok = stats.size.dtype == stats.mtime_ns.dtype == np.int64 and stats.digest.dtype == np.uint8
    return stats if shapes_ok and types_ok else None


def _save(path: Path, key: str, stats: _Stats) -> None:
    """Write the cache atomically (a temporary file in the same folder, then ``os.replace``); a failure to
    write is a warning (the next start hashes again), not an error."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.savez(handle, key=np.array(key), size=stats.size, mtime_ns=stats.mtime_ns, digest=stats.digest)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        rank_zero_warn(f"file digests not remembered ({error}); the next start hashes these files again")


def _my_share(
    files: Sequence[str | os.PathLike],
    rows: np.ndarray,
    cached: _Stats | None,
    digest: Callable[[int], bytes],
    workers: int,
    progress: str | None,
) -> tuple[_Stats, int]:
    """``(stats of files[rows], how many were hashed)``: remembered digests where a file is unchanged."""
    stats = list(threaded_map(lambda i: os.stat(files[i]), rows, workers))
    size = np.array([s.st_size for s in stats], dtype=np.int64)
    mtime = np.array([s.st_mtime_ns for s in stats], dtype=np.int64)
    digests = np.zeros((len(rows), DIGEST_SIZE), dtype=np.uint8)
    fresh = np.zeros(len(rows), dtype=bool)
    if cached is not None:
        fresh = (cached.size[rows] == size) & (cached.mtime_ns[rows] == mtime)
        digests[fresh] = cached.digest[rows[fresh]]
    todo = np.flatnonzero(~fresh)
    show = progress is not None and len(todo) >= PROGRESS_MIN
    with tqdm(total=len(todo), desc=progress, disable=not show, leave=False, unit="file") as bar:
        for position, value in zip(
            todo, threaded_map(lambda j: digest(int(rows[j])), todo, workers), strict=True
        ):
            digests[position] = np.frombuffer(value, dtype=np.uint8)
            bar.update()
    return _Stats(size, mtime, digests), len(todo)


def file_digests(
    files: Sequence[str | os.PathLike],
    digest: Callable[[int], bytes] | None = None,
    kind: str = "bytes",
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    what: str = "files",
) -> np.ndarray:
    """uint8 ``[N, 16]`` digests of ``files`` (in order), each file hashed once (see the module docstring).

    Args:
        files: the N files of a set.
        digest: ``digest(i)`` -> the 16-byte digest of item ``i`` (default: BLAKE2b-128 of ``files[i]``'s bytes,
            :func:`bytes_digest`); e.g. of the decoded, converted pixels instead.
        kind: what ``digest`` hashes (``"bytes"``, or e.g. the pixel conversion): part of the cache key, so
            digests of one kind are never read as another's.
        cache_dir: folder of the cache files (default :func:`digest_cache_dir`).
        workers: threads per rank (default: the CPU count, at most 16).
        what: names the set in the progress bar and in errors.

    Raises:
        OSError: on every rank, when a file cannot be read on any rank (naming the first ones and their rank).
    """
    n, (rank, world) = len(files), distributed_world()
    key = _cache_key(files, kind)
    path = _cache_path(Path(cache_dir) if cache_dir is not None else digest_cache_dir(), key)
    cached = rank_zero_decides(lambda: _load(path, key, n))
    rows = np.arange(rank, n, world)
    hash_one = digest or (lambda i: bytes_digest(files[i]))
    threads = workers or min(16, os.cpu_count() or 1)
    try:
        mine: tuple[bool, object] = (
            True,
            _my_share(files, rows, cached, hash_one, threads, f"Hashing {what}" if rank == 0 else None),
        )
    except Exception as error:  # every rank raises it, instead of the others waiting
        mine = (False, f"rank {rank}: {type(error).__name__}: {error}")
    parts = all_gather_objects(mine)
    failed = [message for ok, message in parts if not ok]
    if failed:
        raise OSError(f"cannot hash the {what} ({n} files): " + "; ".join(map(str, failed)))
    size = np.empty(n, dtype=np.int64)
    mtime = np.empty(n, dtype=np.int64)
    digests = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
    hashed = 0
    for r, (_, (share, count)) in enumerate(parts):  # type: ignore[misc]
        size[r::world], mtime[r::world], digests[r::world] = share.size, share.mtime_ns, share.digest
        hashed += count
    if rank == 0 and (hashed or cached is None):
        _save(path, key, _Stats(size, mtime, digests))
    return digests
