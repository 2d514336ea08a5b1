"""Model files moved between nodes: a node a placement puts layers on, but that lacks the model's
files, copies them from a node that has them, over the peer channel (signed and encrypted like all
peer traffic) — no hub, no shared disk, nothing for the user to copy by hand.

A node that has the files answers `/peer/weights/manifest` (the model's files, their sizes and
sha256) and `/peer/weights/read` (a slice of one of them, at most CHUNK_BYTES: peer replies are
bounded). The copier writes each file as `<name>.partial` where the model belongs in its own models
folder, goes on from where a partial file left by an earlier try stopped, checks the whole file's
sha256 against the manifest, and only then renames it into place — the rules of a download from
the hub, so a copied model is then found as if it had been downloaded.

A reference names the same files on every node: a catalog id (its place in the models folder is
the catalog's), or a name inside the models folder (network references are no more than that).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.daemon.messages import CopyState, HasWeightsReply, WeightFile, WeightsManifest, WeightsManifestReply, WeightsRead
from shoal.daemon.records import InstanceError

log = logging.getLogger("shoal.weights")

CHUNK_BYTES = 768 << 10  # under the peer channel's 1 MiB reply bound, with room for its framing
MAX_FILES = 256
PROGRESS_EVERY = 0.1
COPYING = ".copying"  # in a model folder while a copy fills it  # log a line each tenth of the way


class WeightsError(Exception):
    """A copy that could not be made: no source answered, or the bytes did not match."""


def local_model(model: str) -> Path | None:
    """Where this node has the model's files, or None (also for a reference it would refuse)."""
    from shoal.engine.loader import ModelNotFound, check_network_reference, resolve_model

    try:
        check_network_reference(model)
        path = resolve_model(model)
    except ModelNotFound:
        return None
    if path.is_dir() and (not (path / "config.json").is_file() or (path / COPYING).exists() or any(path.glob("*.partial"))):
        return None  # a folder a copy or download is still filling, or one that stopped half way
    return path


def has_weights(model: str) -> HasWeightsReply:
    path = local_model(model)
    if path is None:
        return HasWeightsReply(has=False)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for _, p in _files_of(path))
    return HasWeightsReply(has=True, bytes=size)


def destination(model: str) -> Path:
    """Where the model's files belong in this node's models folder: a file, or a folder of them."""
    from shoal.catalog import CATALOG
    from shoal.weights.download import model_dir, models_dir

    entry = CATALOG.get(model)
    if entry is not None:
        return model_dir(entry) / entry.filename if entry.filename else model_dir(entry)
    root = Path(os.path.abspath(models_dir()))
    path = Path(os.path.normpath(model if os.path.isabs(model) else root / model))
    if ".." in Path(model).parts or path == root or not path.is_relative_to(root):
        raise WeightsError(f"{model!r} names no place in this node's models folder")
    return path


def _files_of(path: Path) -> list[tuple[str, Path]]:
    """(name in the manifest, path) of a model's files: the file, or a folder's top-level files."""
    if path.is_file():
        return [(path.name, path)]
    out = [(p.name, p) for p in sorted(path.iterdir())
           if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".partial")]
    return out[:MAX_FILES]


class WeightsSource:
    """The side that has the files: what they are, and slices of them."""

    def __init__(self) -> None:
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self._hashes[key] = h.hexdigest()
        return self._hashes[key]

    def _found(self, model: str) -> Path:
        path = local_model(model)
        if path is None:
            raise InstanceError(404, f"this node does not have the files of {model!r}")
        return path

    async def manifest(self, msg: WeightsManifest) -> WeightsManifestReply:
        path = self._found(msg.model)
        files = [WeightFile(name=name, size=p.stat().st_size, sha256=await asyncio.to_thread(self._sha256, p))
                 for name, p in _files_of(path)]
        return WeightsManifestReply(folder=path.is_dir(), files=files)

    async def read(self, msg: WeightsRead) -> bytes:
        path = self._found(msg.model)
        # Only the files the manifest names: a name is looked up, never joined to a path.
        file = dict(_files_of(path)).get(msg.file)
        if file is None:
            raise InstanceError(404, f"{msg.model!r} has no file {msg.file!r}")

        def read() -> bytes:
            with open(file, "rb") as f:
                f.seek(msg.offset)
                return f.read(min(msg.length, CHUNK_BYTES))

        return await asyncio.to_thread(read)


@dataclass
class _Copy:
    source: str  # by name
    done: int
    total: int


class WeightsCopier:
    """The side that lacks the files: copies them from the first source that answers."""

    def __init__(self, manifest: Callable, read: Callable) -> None:
        # manifest(source, WeightsManifest) -> WeightsManifestReply; read(source, WeightsRead) -> bytes
        self._manifest, self._read = manifest, read
        self._running: dict[str, asyncio.Task[int]] = {}  # one copy per model, however many ask
        self._copies: dict[str, _Copy] = {}  # model -> how far its copy is (the listing shows it)

    async def copy(self, model: str, sources: list[str], name: Callable[[str], str]) -> int:
        """Bytes fetched (0 if the files were already here)."""
        task = self._running.get(model)
        if task is None:
            task = asyncio.ensure_future(self._copy(model, sources, name))
            self._running[model] = task
            task.add_done_callback(lambda _: self._running.pop(model, None))
        return await asyncio.shield(task)

    async def _copy(self, model: str, sources: list[str], name: Callable[[str], str]) -> int:
        if local_model(model) is not None:
            return 0
        dest = destination(model)
        errors = []
        for src in sources:
            try:
                manifest = await self._manifest(src, WeightsManifest(model=model))
            except Exception as e:  # noqa: BLE001 - the next source may answer
                errors.append(f"{name(src)}: {e}")
                continue
            return await self._fetch_all(model, src, name(src), manifest, dest)
        raise WeightsError(f"no node could give the files of {model!r}: " + ("; ".join(errors) or "none has them"))

    def states(self) -> list[CopyState]:
        return [CopyState(model=m, source=c.source, done_bytes=c.done, total_bytes=c.total) for m, c in self._copies.items()]

    async def _fetch_all(self, model: str, src: str, src_name: str, manifest: WeightsManifestReply, dest: Path) -> int:
        copy = self._copies[model] = _Copy(src_name[:256], 0, sum(f.size for f in manifest.files))
        try:
            return await self._fetch_files(model, src, manifest, dest, copy)
        finally:
            self._copies.pop(model, None)

    async def _fetch_files(self, model: str, src: str, manifest: WeightsManifestReply, dest: Path, copy: _Copy) -> int:
        src_name, total = copy.source, copy.total
        t0, done, fetched, next_report = time.monotonic(), 0, 0, PROGRESS_EVERY
        log.info("copying %s (%d files, %.1f MB) from %s", model, len(manifest.files), total / 1e6, src_name)
        if manifest.folder:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / COPYING).touch()  # until every file is in: a folder with some is not the model
        for f in manifest.files:
            target = dest / f.name if manifest.folder else dest
            if target.exists() and target.stat().st_size == f.size:
                done += f.size  # kept by an earlier copy, verified before it was renamed
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            have = partial.stat().st_size if partial.exists() else 0
            if have > f.size:
                partial.unlink()
                have = 0
            h = hashlib.sha256()
            if have:
                log.info("%s: going on from %.1f MB of %.1f MB left by an earlier copy", f.name, have / 1e6, f.size / 1e6)
                await asyncio.to_thread(_hash_into, h, partial)
            done += have
            copy.done = done
            with open(partial, "ab") as out:
                while have < f.size:
                    want = min(CHUNK_BYTES, f.size - have)
                    data = await self._read(src, WeightsRead(model=model, file=f.name, offset=have, length=want))
                    if len(data) != want:
                        raise WeightsError(f"{src_name} sent {len(data)} bytes of {f.name} where {want} were asked for")
                    out.write(data)
                    h.update(data)
                    have += want
                    done += want
                    fetched += want
                    copy.done = done
                    if total and done / total >= next_report:
                        log.info("copying %s from %s: %.0f%% (%.1f of %.1f MB)", model, src_name, 100 * done / total,
                                 done / 1e6, total / 1e6)
                        next_report += PROGRESS_EVERY
            if h.hexdigest() != f.sha256:
                partial.unlink()  # not resumable: the suspect bytes are the ones already there
                raise WeightsError(f"{f.name} of {model!r} from {src_name} does not match its sha256; not kept")
            partial.rename(target)
        if manifest.folder:
            (dest / ".complete").write_text(str(time.time()))  # what a finished hub download leaves
            (dest / COPYING).unlink()
        seconds = time.monotonic() - t0
        log.info("copied %s from %s: %.1f MB in %.1f s (%.1f MB/s)", model, src_name, fetched / 1e6, seconds,
                 fetched / 1e6 / max(seconds, 1e-6))
        return fetched


def _hash_into(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
