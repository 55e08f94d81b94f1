"""The client's caption cache: keys, persistence, and never trusting a damaged file."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

import pytest

from oscar_client.caption_cache import FILE_NAME, CaptionCache, file_digests, file_sha256, settings_key

SETTINGS = {"captioner": "Salesforce/blip-image-captioning-base", "revision": "abc", "dtype": "float32",
            "max_new_tokens": 30, "prompt": ""}
DIGESTS = [f"{i:064x}" for i in range(1200)]  # more than one query chunk (500)


def _filled(directory: Path) -> None:
    with CaptionCache.open(directory) as cache:
        cache.store(SETTINGS, [(d, f"a photo of thing {i}") for i, d in enumerate(DIGESTS)])


def test_file_sha256_is_the_content_hash(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"abc")
    (tmp_path / "copy.jpg").write_bytes(b"abc")  # another path, same content: same key
    assert file_sha256(tmp_path / "a.jpg") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_digests([tmp_path / "a.jpg", tmp_path / "missing.jpg", tmp_path / "copy.jpg"], threads=2) == [
        file_sha256(tmp_path / "a.jpg"), None, file_sha256(tmp_path / "a.jpg")]


def test_settings_key_is_canonical_json() -> None:
    reordered = dict(reversed(list(SETTINGS.items())))
    assert settings_key(reordered) == settings_key(SETTINGS)
    expected = ('{"captioner":"Salesforce/blip-image-captioning-base","dtype":"float32","max_new_tokens":30,'
                '"prompt":"","revision":"abc"}')
    assert settings_key(SETTINGS) == hashlib.sha256(expected.encode()).hexdigest()
    assert settings_key({**SETTINGS, "max_new_tokens": 20}) != settings_key(SETTINGS)


def test_captions_survive_reopening_and_are_keyed_by_settings(tmp_path: Path) -> None:
    _filled(tmp_path)
    with CaptionCache.open(tmp_path) as cache:
        assert len(cache) == len(DIGESTS)
        found = cache.lookup(SETTINGS, [DIGESTS[3], "f" * 64, None, DIGESTS[1100]])
        assert found == ["a photo of thing 3", None, None, "a photo of thing 1100"]
        assert cache.lookup({**SETTINGS, "max_new_tokens": 20}, DIGESTS[:5]) == [None] * 5  # other settings
        assert cache.lookup({**SETTINGS, "revision": "def"}, DIGESTS[:1]) == [None]  # another checkpoint
        cache.store(SETTINGS, [(DIGESTS[3], "a replaced caption")])
        assert cache.lookup(SETTINGS, [DIGESTS[3]]) == ["a replaced caption"]
    assert not (tmp_path / (FILE_NAME + ".corrupt")).exists()


def test_unreadable_images_are_remembered(tmp_path: Path) -> None:
    with CaptionCache.open(tmp_path) as cache:
        cache.store_unreadable([(DIGESTS[0], "UnidentifiedImageError: cannot identify image file")])
    with CaptionCache.open(tmp_path) as cache:
        assert cache.lookup_unreadable([DIGESTS[0], DIGESTS[1], None]) == [
            "UnidentifiedImageError: cannot identify image file", None, None]


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database, it is " * 100)


def _truncated(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _wrong_version(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'version'")


def _foreign_database(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE captions (path TEXT, caption TEXT)")
        db.execute("INSERT INTO captions VALUES ('a.jpg', 'a cat')")


@pytest.mark.parametrize("damage", [_garbage, _truncated, _wrong_version, _foreign_database])
def test_a_corrupt_cache_is_set_aside_and_rebuilt(tmp_path: Path, damage, caplog: pytest.LogCaptureFixture) -> None:
    _filled(tmp_path)
    damage(tmp_path / FILE_NAME)
    with caplog.at_level(logging.WARNING, logger="oscar_client.caption_cache"):
        cache = CaptionCache.open(tmp_path)
    assert "is not usable" in caplog.text and "captioned again" in caplog.text
    assert (tmp_path / (FILE_NAME + ".corrupt")).exists()  # kept for a look
    with cache:
        assert len(cache) == 0 and cache.lookup(SETTINGS, DIGESTS[:3]) == [None] * 3
        cache.store(SETTINGS, [(DIGESTS[0], "a fresh caption")])  # the rebuilt cache works
    with CaptionCache.open(tmp_path) as cache:
        assert cache.lookup(SETTINGS, DIGESTS[:2]) == ["a fresh caption", None]


class _DamagedConnection:
    """A connection to a file damaged while open (what quick_check on open could not see): every statement
    fails as SQLite fails on a malformed page."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, *args, **kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    executemany = execute

    def __enter__(self) -> "_DamagedConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        self.real.close()


@pytest.mark.parametrize("operation, answer, kept", [
    # nothing from the damaged file is trusted: its captions are generated again, its images tried again
    (lambda cache: cache.lookup(SETTINGS, DIGESTS[:2]), [None, None], (None, None)),
    (lambda cache: cache.lookup_unreadable(DIGESTS[:2]), [None, None], (None, None)),
    # a write that met the damage is not lost: it goes into the fresh cache
    (lambda cache: cache.store(SETTINGS, [(DIGESTS[0], "a fresh caption")]), None, ("a fresh caption", None)),
    (lambda cache: cache.store_unreadable([(DIGESTS[1], "OSError: truncated")]), None, (None, "OSError: truncated")),
])
def test_damage_met_mid_run_sets_the_file_aside_and_goes_on(tmp_path: Path, operation, answer, kept,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    _filled(tmp_path)
    with caplog.at_level(logging.WARNING, logger="oscar_client.caption_cache"), CaptionCache.open(tmp_path) as cache:
        cache._db = _DamagedConnection(cache._db)
        assert operation(cache) == answer
        assert "is not usable" in caplog.text and (tmp_path / (FILE_NAME + ".corrupt")).exists()
    with CaptionCache.open(tmp_path) as cache:
        assert (cache.lookup(SETTINGS, [DIGESTS[0]])[0], cache.lookup_unreadable([DIGESTS[1]])[0]) == kept
        assert cache.lookup(SETTINGS, [DIGESTS[5]]) == [None]  # the old records stay in the file set aside


def test_a_record_that_fails_its_check_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _filled(tmp_path)
    with sqlite3.connect(tmp_path / FILE_NAME) as db:  # edited behind the cache's back
        db.execute("UPDATE captions SET caption = 'a tampered caption' WHERE image_sha256 = ?", (DIGESTS[7],))
        db.execute("UPDATE unreadable SET reason = 'x'")  # (no rows: harmless)
    with caplog.at_level(logging.WARNING, logger="oscar_client.caption_cache"), CaptionCache.open(tmp_path) as cache:
        found = cache.lookup(SETTINGS, DIGESTS[6:9])
        assert found == ["a photo of thing 6", None, "a photo of thing 8"]
        assert "1 record(s) failed their checksum" in caplog.text
        assert len(cache) == len(DIGESTS) - 1  # dropped, to be captioned again
    assert not (tmp_path / (FILE_NAME + ".corrupt")).exists()  # one bad record does not discard the rest


def test_an_empty_file_is_a_new_cache(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"")  # what an interrupted first open can leave
    with CaptionCache.open(tmp_path) as cache:
        cache.store(SETTINGS, [(DIGESTS[0], "a cat")])
    with CaptionCache.open(tmp_path) as cache:
        assert cache.lookup(SETTINGS, DIGESTS[:1]) == ["a cat"]
