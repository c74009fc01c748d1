"""Atomic file writes and pickle-free array containers."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile

import numpy as np

from .errors import EdgeSplError

TEMP_PREFIX = ".tmp-"   # atomic_write_bytes' temp files; lock_folder sweeps dead ones


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a
    mix: temp file in the same folder, fsync, rename, fsync the folder. `mode` (e.g. 0o600 for a
    private key) is set before any byte is written; default: the usual mode under the umask."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        # mkstemp makes 0600; give the usual file mode unless asked for another
        os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LOCK_FILE = ".lock"


def lock_folder(folder: str | os.PathLike, who: str):
    """Hold an exclusive lock on FOLDER/.lock until the returned file is closed (or the process
    ends, however it ends: the OS drops the lock). Two processes on one state folder would
    overwrite each other's state; the second one gets a one-line error instead. The temp files
    of atomic_write_bytes that a crashed holder left behind are removed: only the holder writes
    there, so they are dead, and a device killed often would otherwise fill its disk with them."""
    import fcntl

    path = os.path.join(os.fspath(folder), LOCK_FILE)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise EdgeSplError(f"{path}: cannot create the lock file ({e.strerror})") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise EdgeSplError(f"{os.fspath(folder)} is in use by another {who} (it holds {path}); "
                           f"stop that one first, or use another folder") from None
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
    return f


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays to .npz bytes (no pickle, uncompressed so packing stays cheap on a Pi)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack_arrays(data: bytes, max_bytes: int | None = None, max_arrays: int | None = None
                  ) -> dict[str, np.ndarray]:
    """.npz bytes to arrays; never unpickles. Raises ValueError on anything that is not a
    plain-array npz.

    The container may come from the network, so nothing is allocated on its word: every array's
    size is checked against what the zip member really holds before it is read, and the arrays
    together may not unpack to more than `max_bytes` (default: 1 GiB); a compressed member that
    would inflate past that (a zip bomb) is refused before it is inflated."""
    limit = (1 << 30) if max_bytes is None else int(max_bytes)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if max_arrays is not None and len(infos) > max_arrays:
                raise ValueError(f"{len(infos)} arrays, at most {max_arrays} expected")
            if sum(i.file_size for i in infos) > limit:
                raise ValueError(f"arrays would unpack to more than {limit} bytes")
            out = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not an .npy array")
                with zf.open(info) as f:
                    out[info.filename[:-4]] = _read_npy(f, info.file_size, info.filename)
            return out
    except (OSError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, KeyError,
            UnicodeDecodeError, SyntaxError, TypeError, OverflowError, RuntimeError,
            NotImplementedError, MemoryError) as e:
        # RuntimeError: zipfile's "encrypted member"; NotImplementedError: unknown compression
        raise ValueError(f"not a valid array container: {type(e).__name__}: {e}") from None


def _read_npy(f, size: int, name: str) -> np.ndarray:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{name}: .npy version {version} not supported")
    if dtype.hasobject or dtype.itemsize == 0:
        raise ValueError(f"{name}: dtype {dtype} is not a plain numeric array")
    count = 1
    for n in shape:
        count *= int(n)
    nbytes = count * dtype.itemsize
    header = f.tell()
    if nbytes != size - header:
        raise ValueError(f"{name}: header says {nbytes} bytes of data, the member holds {size - header}")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise ValueError(f"{name}: truncated")
    a = np.frombuffer(bytearray(raw), dtype=dtype)
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
