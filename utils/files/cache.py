r"""Where stage 4's caches live (the feature visualizations' spectrum, the SAE): in the store, or, where the store
cannot be written (a shared read-only store), in the user's cache folder.

A cache file ``{store}/{sub}/{file}`` (``names.spectrum_cache``, ``names.sae_cache``) is read from the store
where it is there, else from

    ${XDG_CACHE_HOME:-~/.cache}/channel_disentanglement/{16 hex digits of sha256(the store's absolute path)}/{sub}/{file}

and a new one is written into the store when a file can be created there, else into that folder, with one
line saying so (once per store and process). Whether the store can be written is tried, not asked
(``writable`` creates and removes a temporary file): permission bits say nothing for root, nor for a read-only
mount. Neither writable: one line naming both and ``XDG_CACHE_HOME``.
"""
import hashlib
import os
import tempfile

from utils.files import leftovers
from utils.errors import UserError

TOOL = "channel_disentanglement"
_said = set()


def writable(folder):
    """Whether this process can create a file in ``folder`` (made if missing): it tries, and removes the file."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=leftovers.temp_prefix("write_test"), dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def user_cache_dir():
    """``$XDG_CACHE_HOME/channel_disentanglement`` (``~/.cache/channel_disentanglement`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, TOOL)


def fallback(path, store_dir):
    """Where the store's cache file ``path`` goes when the store cannot be written."""
    store = os.path.abspath(store_dir)
    key = hashlib.sha256(store.encode()).hexdigest()[:16]
    return os.path.join(user_cache_dir(), key, os.path.relpath(os.path.abspath(path), store))


def candidates(path, store_dir):
    """The places to read the cache file ``path`` of ``store_dir`` from, in order: the store, the fallback."""
    return [path, fallback(path, store_dir)]


def write_path(path, store_dir, log=print):
    """Where to write the cache file ``path`` of ``store_dir``: ``path`` when its folder can be written, else the
    fallback (said in one line, once per store); UserError (one line) when neither can be."""
    if writable(os.path.dirname(path)):
        return path
    other = fallback(path, store_dir)
    if not writable(os.path.dirname(other)):
        raise UserError(f"cannot write the cache {os.path.basename(path)}: neither {os.path.dirname(path)} nor "
                        f"{os.path.dirname(other)} is writable; set XDG_CACHE_HOME to a writable folder")
    if os.path.abspath(store_dir) not in _said:
        _said.add(os.path.abspath(store_dir))
        log(f"note: the store {store_dir} is read-only: caches go to {os.path.dirname(os.path.dirname(other))}")
    return other
