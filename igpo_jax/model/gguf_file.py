"""A GGUF file's metadata and dequantised tensors: parsed once per process, and kept on disk so
that a second run, a resumed run and every member of a sweep skip the parse and the dequantisation.

    IGPO_JAX_WEIGHTS_CACHE=/path   the cache directory (default: $XDG_CACHE_HOME/igpo_jax/weights,
                                   next to the compilation cache); 'off' (or '') turns it off

Measured on the dev CPU for SmolLM2-135M (Q4_1, the embedded default): parsing the file's fields
(a 49k-token vocabulary and 49k merges) took 2.0 s CPU and dequantising 0.9 s; both are read back
from the cache in a fraction of that (metadata as JSON, tensors as memory-mapped .npy files).

An entry is keyed by the file's absolute path, size and modification time (and the `gguf`
package's version, which does the dequantising): a changed file gets a new entry, and the old
one is removed when the new one is written, as are entries of the same name whose file no longer
exists (a deleted virtual environment's copy of the model). Each part of an entry is written
under a temporary name and renamed into place, so a reader never sees half of one and concurrent
writers (hosts sharing a home directory) leave one complete copy. A cache that cannot be written (read-only,
full disk) or an entry that cannot be read logs a warning, and the file is read as if there were
no cache. Tensors are stored in the loader's parameter dtype (casting before or after the layout
change gives the same bits); a model whose dequantised weights exceed MAX_CACHED_BYTES is not
cached (a 7B model would put 14-28 GB on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np
from absl import logging

from igpo_jax.runtime import compilation_cache

ENV = "IGPO_JAX_WEIGHTS_CACHE"
FORMAT = 1  # bump when an entry's layout changes
MAX_CACHED_BYTES = 4 << 30
_METADATA = "metadata.json"


def cache_dir(environ=None) -> str | None:
    """The directory the cache uses, or None when it is turned off."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    if value is None:
        return os.path.join(compilation_cache.user_cache_root(environ), "weights")
    return None if value.strip().lower() in ("", "off", "0", "false", "none") else value


@dataclasses.dataclass(frozen=True)
class GgufFile:
    """What a loader needs from a GGUF file before reading any tensor."""

    path: str  # absolute
    metadata: dict  # key → plain Python value (GGUF.* header fields left out)
    tensor_shapes: dict  # tensor name → shape, outermost first (numpy order)
    entry: str | None  # this file's cache entry, None without a usable cache


def open_gguf(path: str) -> GgufFile:
    """The file's metadata and tensor shapes: from the cache when it has them, else parsed
    (and then written to it). Once per process while the file is unchanged: the weights and the
    tokenizer both ask."""
    stat = os.stat(path)
    return _open(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, cache_dir())


def parsed(path: str):
    """The file's `gguf.GGUFReader` (parsed once per process while the file is unchanged)."""
    stat = os.stat(path)
    return _reader(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def _metadata_of(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _entry_name(path: str, size: int, mtime_ns: int) -> str:
    try:
        dequantiser = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        dequantiser = "?"
    key = hashlib.sha256(f"{FORMAT}\0{path}\0{size}\0{mtime_ns}\0{dequantiser}".encode()).hexdigest()[:16]
    return f"{os.path.splitext(os.path.basename(path))[0]}-{key}"


@functools.lru_cache(maxsize=2)
def _open(path: str, size: int, mtime_ns: int, root: str | None) -> GgufFile:
    entry = os.path.join(root, _entry_name(path, size, mtime_ns)) if root else None
    if entry is not None and os.path.exists(os.path.join(entry, _METADATA)):
        try:
            with open(os.path.join(entry, _METADATA), encoding="utf-8") as f:
                stored = json.load(f)
            if (stored["source"], stored["size"], stored["mtime_ns"]) == (path, size, mtime_ns):
                return GgufFile(path, stored["metadata"], {k: tuple(v) for k, v in stored["tensors"].items()}, entry)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logging.warning("igpo_jax: unreadable weights cache entry %s (%s); reading %s instead", entry, e, path)
        _remove(entry)
    reader = _reader(path, size, mtime_ns)
    shapes = {t.name: tuple(reversed([int(d) for d in t.shape])) for t in reader.tensors}  # GGUF: innermost first
    file = GgufFile(path, _metadata_of(reader), shapes, None)
    if entry is not None and _write_metadata(file, size, mtime_ns, entry):
        file = dataclasses.replace(file, entry=entry)
    return file


def _write_metadata(file: GgufFile, size: int, mtime_ns: int, entry: str) -> bool:
    """Writes the entry's metadata (removing older entries of the same file); False when the
    cache cannot be written."""
    root = os.path.dirname(entry)
    stored = dict(format=FORMAT, source=file.path, size=size, mtime_ns=mtime_ns, metadata=file.metadata,
                  tensors={k: list(v) for k, v in file.tensor_shapes.items()})
    try:
        text = json.dumps(stored)
    except (TypeError, ValueError) as e:  # a value JSON cannot hold: this file is not cached
        logging.warning("igpo_jax: %s has metadata the weights cache cannot store (%s); not cached", file.path, e)
        return False
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        with open(os.path.join(tmp, _METADATA), "w", encoding="utf-8") as f:
            f.write(text)
        if not _rename_into_place(tmp, entry):
            return os.path.exists(os.path.join(entry, _METADATA))
    except OSError as e:
        logging.warning("igpo_jax: cannot write the weights cache at %s (%s); set %s to another directory or "
                        "'off'. Reading %s without it.", root, e, ENV, file.path)
        return False
    _remove_older_entries(file.path, entry)
    return True


def _rename_into_place(tmp: str, final: str) -> bool:
    """Atomic publish of a finished directory; False (and `tmp` removed) when another writer won."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not os.path.exists(final):
            _remove(tmp)
            raise
        _remove(tmp)
        return False


def _remove_older_entries(path: str, keep: str) -> None:
    """Removes the entries of an older version of `path`, and those whose file is gone: a GGUF
    inside a virtual environment that was deleted (CI builds a new one every run, each installing
    the embedded model at a new path) would otherwise leave ~0.5 GB behind per environment."""
    root, stem = os.path.dirname(keep), os.path.basename(keep).rsplit("-", 1)[0]
    for name in os.listdir(root):
        other = os.path.join(root, name)
        if name.rsplit("-", 1)[0] != stem or other == keep:
            continue
        try:
            with open(os.path.join(other, _METADATA), encoding="utf-8") as f:
                source = json.load(f).get("source")
        except (OSError, ValueError):
            continue
        if source == path or (isinstance(source, str) and not os.path.exists(source)):
            _remove(other)


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def dequantised(file: GgufFile, dtype) -> Iterator[Callable[[str, Callable[[], np.ndarray]], np.ndarray]]:
    """`get(name, make)`: tensor `name` in `dtype`, from the cache, or `make()` (the dequantised
    float32 array, in the file's layout) cast to `dtype`. Made tensors are written as they come
    (no second copy of the model on the host) and published when the block ends without an error."""
    dtype = np.dtype(dtype)
    folder = None if file.entry is None else os.path.join(file.entry, dtype.name)
    total = sum(int(np.prod(s)) for s in file.tensor_shapes.values()) * dtype.itemsize
    cached = folder is not None and os.path.isdir(folder)
    writer = _TensorWriter(file, folder) if folder is not None and not cached and total <= MAX_CACHED_BYTES else None
    damaged = []

    def get(name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        if cached:
            try:  # read into memory (not memory-mapped): the array may become a device buffer
                array = np.load(os.path.join(folder, name + ".npy"))
                array = array.view(dtype) if array.dtype != dtype else array
                if array.shape == file.tensor_shapes[name]:
                    return array
                raise ValueError(f"shape {array.shape}, expected {file.tensor_shapes[name]}")
            except (OSError, ValueError, KeyError) as e:
                if not damaged:
                    logging.warning("igpo_jax: weights cache entry %s is damaged (%s: %s); reading %s instead",
                                    folder, name, e, file.path)
                damaged.append(name)
        array = np.asarray(make(), dtype=dtype)
        if writer is not None:
            writer.add(name, array)
        return array

    try:
        yield get
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    if damaged:
        _remove(folder)  # the next load writes it again
    if writer is not None:
        writer.publish()


class _TensorWriter:
    """A tensor folder written under a temporary name, renamed into place when complete; the
    first failed write gives up (with a warning) and the load goes on without the cache."""

    def __init__(self, file: GgufFile, folder: str):
        self.file, self.folder, self.tmp = file, folder, None

    def add(self, name: str, array: np.ndarray) -> None:
        if self.folder is None:
            return
        try:
            if self.tmp is None:
                self.tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self.file.entry)
            # numpy's .npy has no bfloat16: such arrays are stored as their bits (viewed back on load)
            np.save(os.path.join(self.tmp, name + ".npy"),
                    array.view(f"u{array.itemsize}") if array.dtype.kind == "V" else array)
        except OSError as e:
            logging.warning("igpo_jax: cannot write the weights cache at %s (%s); the next run dequantises %s "
                            "again", self.folder, e, self.file.path)
            self.discard()

    def discard(self) -> None:
        if self.tmp is not None:
            _remove(self.tmp)
        self.folder = self.tmp = None

    def publish(self) -> None:
        if self.folder is None or self.tmp is None:
            return
        try:
            _rename_into_place(self.tmp, self.folder)
        except OSError as e:
            logging.warning("igpo_jax: cannot write the weights cache at %s (%s)", self.folder, e)
