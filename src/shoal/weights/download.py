"""Fetching model files from a Hugging Face–style hub.

Plain HTTP with the hub's two public endpoints — `GET /api/models/{repo}` for the file list and
`GET /{repo}/resolve/{revision}/{file}` for a file — so any mirror that speaks them works (set
`SHOAL_HF_ENDPOINT`, or `HF_ENDPOINT`). Files land in `<models dir>/<repo>/`, written to a
`.partial` file first and renamed when complete, so an interrupted download is resumed (HTTP Range)
and never mistaken for a finished one. Only the files a model needs are fetched: config, tokenizer
and weights (one GGUF file when the catalog names one).

Every file is checked against the hash the hub lists for it (`?blobs=true`: the sha256 of a large
file kept in Git LFS, the git blob id of a small one) before it is renamed into place; a file the
hub gives no hash for, or whose bytes do not match, is not kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shoal.catalog import CatalogEntry

DEFAULT_ENDPOINT = "https://huggingface.co"
_NEEDED_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")
_CHUNK = 1 << 20


class DownloadError(Exception):
    pass


def endpoint() -> str:
    return (os.environ.get("SHOAL_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def models_dir() -> Path:
    return Path(os.environ.get("SHOAL_MODELS") or Path.home() / ".shoal" / "models")


def model_dir(entry: CatalogEntry) -> Path:
    return models_dir() / entry.hf_repo


def cached_model_path(entry: CatalogEntry) -> Path | None:
    """The local path of a fully downloaded catalog model, or None."""
    d = model_dir(entry)
    if entry.filename:
        f = d / entry.filename
        return f if f.is_file() else None
    return d if (d / "config.json").is_file() and (d / ".complete").exists() else None


def _request(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0):
    req = urllib.request.Request(url, headers={"User-Agent": "shoal", **(headers or {})})
    token = os.environ.get("HF_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=timeout)


@dataclass(frozen=True)
class HubFile:
    """A file as the hub lists it, with what its bytes must hash to."""

    name: str
    sha256: str | None = None  # a Git LFS file's
    git_blob: str | None = None  # a small file's: sha1 of "blob <size>\0" + bytes
    size: int | None = None

    def check(self, path: Path) -> str | None:
        """None if the file's bytes are the ones the hub named, else what is wrong."""
        if self.sha256 is None and self.git_blob is None:
            return "the hub lists no hash for it, so it cannot be verified"
        h = hashlib.sha256() if self.sha256 else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        want = self.sha256 or self.git_blob
        if h.hexdigest() != (want or "").lower():
            return f"its bytes do not match the hub's {'sha256' if self.sha256 else 'git hash'} (corrupted or altered on the way)"
        return None


def list_files(repo: str, revision: str = "main") -> dict[str, HubFile]:
    url = f"{endpoint()}/api/models/{repo}/revision/{revision}?blobs=true"
    try:
        with _request(url) as r:
            info = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{repo}: the hub answered {e.code} for the file list") from None
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        raise DownloadError(f"{repo}: cannot read the file list from {endpoint()} ({e})") from None
    out = {}
    for s in info.get("siblings", []):
        if isinstance(s, dict) and isinstance(s.get("rfilename"), str):
            lfs = s.get("lfs") if isinstance(s.get("lfs"), dict) else {}
            size = lfs.get("size", s.get("size"))
            out[s["rfilename"]] = HubFile(s["rfilename"], lfs.get("sha256") or lfs.get("oid"), s.get("blobId"),
                                          size if isinstance(size, int) else None)
    return out


def download_file(repo: str, file: HubFile, dest: Path, revision: str = "main",
                  progress: Callable[[str, int, int | None], None] | None = None) -> Path:
    """Download one file, resuming a `.partial` left by an earlier attempt; verified before it is kept."""
    filename = file.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    url = f"{endpoint()}/{repo}/resolve/{revision}/{filename}"
    headers = {"Range": f"bytes={have}-"} if have else {}
    total = None
    try:
        with _request(url, headers) as r:
            if have and r.status != 206:  # the server ignored the range: start over
                have = 0
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(partial, "ab" if have else "wb") as f:
                done = have
                while chunk := r.read(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(filename, done, total)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the partial file is complete
            pass
        else:
            raise DownloadError(f"{repo}/{filename}: the hub answered {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{repo}/{filename}: download interrupted ({e}); run again to resume") from None
    if total is not None and partial.stat().st_size != total:
        raise DownloadError(f"{repo}/{filename}: got {partial.stat().st_size} of {total} bytes; run again to resume")
    wrong = file.check(partial)
    if wrong is not None:
        partial.unlink()  # not resumable: the bytes already there are the suspect ones
        raise DownloadError(f"{repo}/{filename}: not kept: {wrong}")
    partial.rename(dest)
    return dest


def needed_files(entry: CatalogEntry) -> list[HubFile]:
    """The files a catalog model needs, as the hub lists them (one request)."""
    listed = list_files(entry.hf_repo)
    if entry.filename:
        if entry.filename not in listed:
            raise DownloadError(f"{entry.hf_repo}: the hub does not list {entry.filename}")
        return [listed[entry.filename]]
    files = [f for f in listed if f.endswith(_NEEDED_SUFFIXES) and "/" not in f]
    if "config.json" not in files:
        raise DownloadError(f"{entry.hf_repo}: no config.json in the repository")
    return [listed[f] for f in files]


def download(entry: CatalogEntry, progress: Callable[[str, int, int | None], None] | None = None,
             files: list[HubFile] | None = None) -> Path:
    """Fetch what a catalog model needs (`files`, when the caller listed them already); return the
    local path to load it from."""
    d = model_dir(entry)
    files = needed_files(entry) if files is None else files
    for f in files:
        download_file(entry.hf_repo, f, d / f.name, progress=progress)
    if entry.filename:
        return d / entry.filename
    (d / ".complete").write_text(str(time.time()))
    return d


def remove(entry: CatalogEntry) -> bool:
    """Delete a downloaded catalog model's files (finished or partial); False if there were none."""
    d = model_dir(entry)
    if entry.filename:
        found = False
        for f in (d / entry.filename, d / (entry.filename + ".partial")):
            if f.exists():
                f.unlink()
                found = True
        with contextlib.suppress(OSError):
            d.rmdir()  # only if nothing else lives there
        return found
    if not d.is_dir():
        return False
    shutil.rmtree(d)
    return True


class ProgressBar:
    """One line on stderr, rewritten in place: file, bar, MB done of total, MB/s and time left.
    Redrawn at most ten times a second (and once when a file completes)."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._file: str | None = None
        self._t0 = self._drawn_at = 0.0
        self._start_bytes = 0

    def __call__(self, filename: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if filename != self._file:  # rate and ETA count from this file's first bytes (a resume skips the rest)
            self._file, self._t0, self._start_bytes, self._drawn_at = filename, now, done, 0.0
        finished = total is not None and done >= total
        if not finished and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        elapsed = now - self._t0
        rate = (done - self._start_bytes) / elapsed if elapsed > 0 else 0.0
        if total:
            filled = int(self.WIDTH * done / total)
            eta = _clock((total - done) / rate) if rate > 0 else "--:--"
            line = (f"{filename}  [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done / 1e6:.1f}/{total / 1e6:.1f} MB "
                    f"{100 * done / total:3.0f}%  {rate / 1e6:.1f} MB/s  ETA {eta}")
        else:
            line = f"{filename}  {done / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s"
        # \r rewrites the line; \x1b[K clears what a longer previous line left behind.
        self.stream.write("\r" + line + "\x1b[K" + ("\n" if finished else ""))
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
