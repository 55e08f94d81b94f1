"""Captions a client has already generated, kept in its output dir so that a second run captions nothing.

A caption is stored under two keys:

* the **settings** that produced it, as a digest of their canonical JSON: captioner id, the checkpoint's
  revision, dtype, ``max_new_tokens`` and prompt (see ``oscar_client.captioning.caption_settings``). Change
  any of them and the old captions simply stop matching (they stay, for a run that goes back);
* the **image's content**: the SHA-256 of the file's bytes. We chose the content hash over
  path + size + mtime because it survives what clients do to data folders (moving or re-extracting a
  data set, ``cp -r`` without ``-p``, a new mount point, a split file naming the same images by another
  path) and it cannot be fooled by a file rewritten within the mtime resolution. Its cost is reading every
  file once per run, which the second run then pays instead of captioning (reading is cheap next to a
  BLIP forward: 1,280 images hashed and looked up in 0.13 s on the H200 machine, against 4-7 s to caption them).

Storage is one SQLite file (the standard library's ``sqlite3``): every batch of new captions is committed
in one transaction (WAL journal), so a crash loses at most the batch in flight and never leaves a
half-written record. Nothing is pickled.

Images that could not be decoded are remembered too (by content hash alone: decoding does not depend on
the captioner), so a second run with a broken file among cached ones does not load the captioner for it.

Never trusted blindly: on open, the file must be a SQLite database that passes ``PRAGMA quick_check`` and
carries this format's header and version; each record carries a checksum of (settings, image, caption),
checked on every read. A corrupt file is logged, kept beside the cache as ``<name>.corrupt`` for a look,
and replaced by a fresh cache; a record that fails its check is logged, dropped and captioned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from oscar_common.logs import progress

log = logging.getLogger(__name__)

FILE_NAME = "caption-cache.sqlite3"
FORMAT = "oscar-caption-cache"
VERSION = 1
_QUERY_CHUNK = 500  # SQLite's host-parameter limit is 999 on old builds


class CorruptCacheError(RuntimeError):
    """The cache file is not what this module writes (or is damaged)."""


def settings_key(settings: Mapping[str, Any]) -> str:
    """A stable digest of the caption settings (canonical JSON: sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The SHA-256 of a file's bytes, or None when it cannot be read (the captioner will skip it)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def file_digests(paths: Sequence[str | os.PathLike[str]], *, threads: int) -> list[str | None]:
    """:func:`file_sha256` of every path, in order, on ``threads`` threads (hashlib releases the GIL)."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = pool.map(file_sha256, paths)
        return list(progress(digests, total=len(paths), desc="hashing images", unit="img", logger=log,
                             leave=False))


class CaptionCache:
    """Captions by (settings, image content hash) in ``<output_dir>/caption-cache.sqlite3``.

    Use :meth:`open`; the cache holds captions of any number of settings. One process at a time.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, output_dir: str | os.PathLike[str]) -> "CaptionCache":
        """Open (or create) the cache of a client's output dir; a corrupt one is set aside and rebuilt."""
        path = Path(output_dir) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = _connect_checked(path)
        except (sqlite3.DatabaseError, CorruptCacheError) as exc:
            connection = _rebuild(path, exc)
        return cls(path, connection)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "CaptionCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ records
    def lookup(self, settings: Mapping[str, Any], digests: Sequence[str | None]) -> list[str | None]:
        """The cached caption of each image digest under ``settings`` (None: not cached, or failed its check)."""
        key = settings_key(settings)
        wanted = sorted({d for d in digests if d is not None})
        found: dict[str, str] = {}
        bad: list[str] = []
        try:
            for start in range(0, len(wanted), _QUERY_CHUNK):
                chunk = wanted[start : start + _QUERY_CHUNK]
                rows = self._db.execute(
                    "SELECT image_sha256, caption, checksum FROM captions WHERE settings_key = ? AND image_sha256 IN "
                    f"({','.join('?' * len(chunk))})", [key, *chunk]).fetchall()
                for digest, caption, checksum in rows:
                    if isinstance(caption, str) and checksum == _checksum(key, digest, caption):
                        found[digest] = caption
                    else:
                        bad.append(digest)
            if bad:
                log.warning("caption cache %s: %d record(s) failed their checksum; dropped, they will be captioned "
                            "again", self.path, len(bad))
                with self._db:
                    self._db.executemany("DELETE FROM captions WHERE settings_key = ? AND image_sha256 = ?",
                                         [(key, d) for d in bad])
        except sqlite3.DatabaseError as exc:
            self._start_over(exc)
            return [None] * len(digests)
        return [found.get(d) if d is not None else None for d in digests]

    def lookup_unreadable(self, digests: Sequence[str | None]) -> list[str | None]:
        """The recorded reason why each image could not be decoded, or None (not known to be unreadable)."""
        wanted = sorted({d for d in digests if d is not None})
        found: dict[str, str] = {}
        try:
            for start in range(0, len(wanted), _QUERY_CHUNK):
                chunk = wanted[start : start + _QUERY_CHUNK]
                rows = self._db.execute("SELECT image_sha256, reason, checksum FROM unreadable WHERE image_sha256 IN "
                                        f"({','.join('?' * len(chunk))})", chunk).fetchall()
                # A record failing its check is simply not believed: the image is tried again.
                found.update((digest, reason) for digest, reason, checksum in rows
                             if isinstance(reason, str) and checksum == _checksum("unreadable", digest, reason))
        except sqlite3.DatabaseError as exc:
            self._start_over(exc)
            return [None] * len(digests)
        return [found.get(d) if d is not None else None for d in digests]

    def store_unreadable(self, records: Iterable[tuple[str, str]]) -> None:
        """Remember ``(image digest, reason)`` of images that could not be decoded."""
        rows = [(digest, reason, _checksum("unreadable", digest, reason)) for digest, reason in records]
        if not rows:
            return
        sql = "INSERT OR REPLACE INTO unreadable (image_sha256, reason, checksum) VALUES (?, ?, ?)"
        try:
            with self._db:
                self._db.executemany(sql, rows)
        except sqlite3.DatabaseError as exc:
            self._start_over(exc)
            with self._db:
                self._db.executemany(sql, rows)

    def store(self, settings: Mapping[str, Any], records: Iterable[tuple[str, str]]) -> None:
        """Add ``(image digest, caption)`` pairs under ``settings``, all in one transaction."""
        key = settings_key(settings)
        rows = [(key, digest, caption, _checksum(key, digest, caption)) for digest, caption in records]
        if not rows:
            return
        try:
            self._write(key, settings, rows)
        except sqlite3.DatabaseError as exc:
            self._start_over(exc)
            self._write(key, settings, rows)

    def _start_over(self, damage: sqlite3.DatabaseError) -> None:
        """Damage that ``quick_check`` did not see on open, met mid-run: the file is set aside and an empty
        cache takes its place (what it held is captioned again)."""
        self._db.close()
        self._db = _rebuild(self.path, damage)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM captions").fetchone()[0])

    def _write(self, key: str, settings: Mapping[str, Any], rows: list[tuple[str, str, str, str]]) -> None:
        with self._db:  # one transaction: all of the batch or none of it
            self._db.execute("INSERT OR IGNORE INTO settings (key, json) VALUES (?, ?)", (key, _canonical(settings)))
            self._db.executemany("INSERT OR REPLACE INTO captions (settings_key, image_sha256, caption, checksum) "
                                 "VALUES (?, ?, ?, ?)", rows)


# ---------------------------------------------------------------------- file handling
def _canonical(settings: Mapping[str, Any]) -> str:
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _checksum(key: str, digest: str, caption: str) -> str:
    return hashlib.sha256(f"{key}\0{digest}\0{caption}".encode()).hexdigest()[:32]


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level="DEFERRED")
    connection.execute("PRAGMA journal_mode=WAL")  # a crash mid-write rolls back to the last commit
    connection.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable up to the last few commits, never corrupt
    return connection


def _connect_checked(path: Path) -> sqlite3.Connection:
    connection = _connect(path)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:  # a new (or empty) file
            _create(connection)
            return connection
        problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptCacheError("quick_check: " + "; ".join(problems[:3]))
        if not {"meta", "settings", "captions", "unreadable"} <= tables:
            raise CorruptCacheError(f"unexpected tables {sorted(tables)}")
        meta = dict(connection.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            raise CorruptCacheError(f"header {meta} is not format {FORMAT!r} version {VERSION}")
        return connection
    except BaseException:
        connection.close()
        raise


def _create(connection: sqlite3.Connection) -> None:
    with connection:
        connection.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        connection.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, json TEXT NOT NULL)")
        connection.execute("CREATE TABLE captions (settings_key TEXT NOT NULL, image_sha256 TEXT NOT NULL, "
                           "caption TEXT NOT NULL, checksum TEXT NOT NULL, PRIMARY KEY (settings_key, image_sha256)) "
                           "WITHOUT ROWID")
        connection.execute("CREATE TABLE unreadable (image_sha256 TEXT PRIMARY KEY, reason TEXT NOT NULL, "
                           "checksum TEXT NOT NULL) WITHOUT ROWID")
        connection.executemany("INSERT INTO meta (name, value) VALUES (?, ?)",
                               [("format", FORMAT), ("version", str(VERSION))])


def _rebuild(path: Path, reason: BaseException) -> sqlite3.Connection:
    aside = path.with_name(path.name + ".corrupt")
    log.warning("caption cache %s is not usable (%s): moved to %s, starting an empty cache (its images will be "
                "captioned again)", path, reason, aside)
    if path.exists():
        os.replace(path, aside)
    for suffix in ("-wal", "-shm"):  # journal files belong to the old database
        Path(str(path) + suffix).unlink(missing_ok=True)
    connection = _connect(path)
    _create(connection)
    return connection
