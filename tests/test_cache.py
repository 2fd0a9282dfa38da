"""Caches of a read-only store (``utils.files.cache``): the spectrum goes to the user's cache folder, with one line.

The tests run as root, and root may write into a folder whatever its permission bits say (a chmod'ed store
would be written all the same), so a read-only store is simulated where the system refuses it: every
``os.open`` that would create a file, and every ``os.mkdir``, under the store fails with EROFS, as on a
read-only mount. ``cache.writable`` tries to create a file, so it sees what a real read-only store shows.
"""
import errno
import os

import pytest
import torch

from utils.featurevis import spectrum
from utils.files import cache, names
from utils.errors import UserError


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): from now on, nothing can be created under ``folder``."""
    real_open, real_mkdir, frozen = os.open, os.mkdir, []

    def under(path):
        path = os.path.abspath(os.fspath(path))
        return any(path == f or path.startswith(f + os.sep) for f in frozen)

    def guarded_open(path, flags, *a, **k):
        if flags & os.O_CREAT and under(path):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *a, **k)

    def guarded_mkdir(path, *a, **k):
        if under(path):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    return lambda folder: frozen.append(os.path.abspath(folder))


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_writable_is_tried_not_asked(tmp_path, read_only):
    store = tmp_path / "store"
    store.mkdir()
    assert cache.writable(str(store)) and _files(str(store)) == []  # the probe file is gone
    read_only(str(store))
    assert not cache.writable(str(store)) and not cache.writable(str(store / "feature_vis_spectra"))


def test_read_only_store_caches_the_spectrum_in_the_users_folder(tmp_path, image_root, read_only, monkeypatch,
                                                                   capsys):
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    read_only(str(store))
    s1, p1, reused1 = spectrum.load_or_make_spectrum(str(store), image_root, 16, 4, 4, 0)
    out = capsys.readouterr().out.strip().splitlines()
    assert not reused1 and _files(str(store)) == []
    assert os.path.dirname(p1) == os.path.dirname(cache.fallback(names.spectrum_cache(str(store), 16, "x"), str(store)))
    assert p1.startswith(str(tmp_path / "cache" / cache.TOOL) + os.sep) and os.path.isfile(p1)
    assert out == [f"note: the store {store} is read-only: caches go to {os.path.dirname(os.path.dirname(p1))}"]
    s2, p2, reused2 = spectrum.load_or_make_spectrum(str(store), image_root, 16, 4, 4, 0)
    assert reused2 and p2 == p1 and all(torch.equal(s1[k], s2[k]) for k in ("magnitude", "q", "mean", "cov"))
    assert capsys.readouterr().out == ""  # nothing more to say: the cache was read, nothing written


def test_read_only_store_with_the_spectrum_reads_it_there(tmp_path, image_root, read_only, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s1, p1, _ = spectrum.load_or_make_spectrum(str(store), image_root, 16, 4, 4, 0)  # written while it could be
    read_only(str(store))
    s2, p2, reused = spectrum.load_or_make_spectrum(str(store), image_root, 16, 4, 4, 0)
    assert reused and p2 == p1 and p1.startswith(str(store)) and not (tmp_path / "cache").exists()
    assert torch.equal(s1["magnitude"], s2["magnitude"])


def test_nowhere_to_write_is_one_line(tmp_path, read_only, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    read_only(str(store))
    read_only(str(tmp_path / "cache"))
    with pytest.raises(UserError) as e:
        cache.write_path(names.spectrum_cache(str(store), 16, "k"), str(store))
    assert "XDG_CACHE_HOME" in str(e.value) and str(store) in str(e.value) and "\n" not in str(e.value)
