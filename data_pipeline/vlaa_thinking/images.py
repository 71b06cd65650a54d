"""Finding VLAA-Thinking images: extracted folders, `images/<source>.tar.gz` archives, external roots.

The dataset repository ships `images/<source>.tar.gz`; users may or may not have extracted them. COCO
and Visual Genome images come from their own sites and live anywhere: `external_roots` maps a source
prefix (first path component, e.g. "coco", "vg") to a directory. A record's image path is looked up as
1. an extracted file `images_root/<path>`;
2. for external sources, `root/<path without its first component>` then `root/<path>`;
3. a member `<path>` (or `<path without the source folder>`) of `images_root/<source>.tar.gz`,
   read without extracting anything.
Paths are checked never to leave their root (`..`, absolute paths, symlinks pointing outside).
An archive that cannot be read (corrupt, truncated, not a tar file) makes every image still wanted from
it a DataError (`bad_archive`) naming the archive; images read from it before the damage are kept.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipeline.records import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# What tarfile / gzip raise on a damaged archive (EOFError: gzip stream cut short).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def archive_error(path: Path, e: BaseException) -> DataError:
    return DataError(f"cannot read image archive {path} ({type(e).__name__}: {e}): it is corrupt or truncated; "
                     f"download it again (`tar tzf {path}` shows where it breaks) or extract it into "
                     f"{path.parent / path.name.split('.')[0]}/", kind="bad_archive", field="image")


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if it stays inside root after resolving symlinks, else None."""
    root_r = root.resolve()
    p = (root / rel).resolve()
    return p if p == root_r or root_r in p.parents else None


def _member_key(source: str, name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    name = name.lstrip("/")
    return name if name.startswith(source + "/") else f"{source}/{name}"


class ImageStore:
    """Reads encoded image bytes for records; raises DataError (missing_image, path_escape) naming the path."""

    def __init__(self, images_root: str | os.PathLike, external_roots: dict[str, str] | None = None):
        self.images_root = Path(images_root)
        self.external_roots = {k.lower(): Path(v) for k, v in (external_roots or {}).items() if v}
        self._archives: dict[str, tarfile.TarFile | None] = {}
        self._members: dict[str, dict[str, tarfile.TarInfo]] = {}
        self._broken: dict[str, DataError] = {}  # source -> why its archive cannot be indexed

    def archive_path(self, source: str) -> Path | None:
        for suffix in ARCHIVE_SUFFIXES:
            p = self.images_root / f"{source}{suffix}"
            if p.is_file():
                return p
        return None

    def file_path(self, rel: str) -> Path | None:
        """Path of an extracted / external image file, or None. DataError if `rel` escapes its root."""
        source, _, rest = rel.partition("/")
        candidates: list[tuple[Path, str]] = [(self.images_root, rel)]
        ext = self.external_roots.get(source.lower())
        if ext is not None:
            candidates = [(ext, rest), (ext, rel)] + candidates
        for root, r in candidates:
            if not r:
                continue
            p = _inside(root, r)
            if p is None:
                raise DataError(f"image path {rel!r} escapes the images root {root}", kind="path_escape", field="image")
            if p.is_file():
                return p
        return None

    def _index(self, source: str) -> dict[str, tarfile.TarInfo]:
        if source in self._broken:
            raise self._broken[source]
        if source not in self._members:
            path = self.archive_path(source)
            if path is None:
                self._archives[source], self._members[source] = None, {}
            else:
                try:
                    tf = tarfile.open(path, "r:*")
                    members = {_member_key(source, m.name): m for m in tf.getmembers() if m.isfile()}
                except ARCHIVE_ERRORS as e:
                    self._broken[source] = archive_error(path, e)
                    raise self._broken[source] from None
                self._archives[source], self._members[source] = tf, members
        return self._members[source]

    def read(self, rel: str) -> bytes:
        """Encoded bytes of image `rel` (random access; archives are indexed once and kept open)."""
        p = self.file_path(rel)
        if p is not None:
            return p.read_bytes()
        source = rel.split("/", 1)[0]
        member = self._index(source).get(rel)
        if member is None:
            raise DataError(self._missing_message(rel), kind="missing_image", field="image")
        try:
            return self._archives[source].extractfile(member).read()
        except ARCHIVE_ERRORS as e:
            raise archive_error(self.archive_path(source), e) from None

    def _missing_message(self, rel: str) -> str:
        source = rel.split("/", 1)[0]
        arch = self.archive_path(source)
        where = [str(self.images_root / rel)] + ([f"{arch}:{rel}"] if arch else [])
        if source.lower() in self.external_roots:
            where.insert(0, str(self.external_roots[source.lower()] / rel.partition("/")[2]))
        return f"image {rel!r} not found (looked in {', '.join(where)})"

    def stream(self, paths: Iterable[str]) -> Iterator[tuple[str, bytes | DataError]]:
        """(path, bytes or DataError) for each distinct path; each archive is read once, front to back.

        Used to build the dataset: gzip archives are not seekable, so random access over a big archive
        would decompress it again and again.
        """
        by_archive: dict[str, set[str]] = {}
        for rel in dict.fromkeys(paths):
            try:
                p = self.file_path(rel)
            except DataError as e:
                yield rel, e
                continue
            if p is not None:
                yield rel, p.read_bytes()
                continue
            source = rel.split("/", 1)[0]
            if self.archive_path(source) is None:
                yield rel, DataError(self._missing_message(rel), kind="missing_image", field="image")
            else:
                by_archive.setdefault(source, set()).add(rel)
        for source, wanted in by_archive.items():
            path = self.archive_path(source)
            try:
                with tarfile.open(path, "r|*") as tf:
                    for m in tf:
                        key = _member_key(source, m.name)
                        if m.isfile() and key in wanted:
                            data = tf.extractfile(m).read()
                            wanted.discard(key)
                            yield key, data
            except ARCHIVE_ERRORS as e:
                broken = archive_error(path, e)
                for rel in sorted(wanted):
                    yield rel, broken
                continue
            for rel in sorted(wanted):
                yield rel, DataError(self._missing_message(rel), kind="missing_image", field="image")

    def close(self) -> None:
        for tf in self._archives.values():
            if tf is not None:
                tf.close()
        self._archives.clear()
        self._members.clear()
