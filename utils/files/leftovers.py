r"""Temporary files of a killed run: named so that the next run can tell them from a live writer's, and removed.

Every file is written under a temporary name beside its final one and renamed into place (``atomic``); a
run killed mid-write (SIGKILL, power cut) leaves that temporary file behind. Its name says who wrote it:

    .tmp_{final name}.{pid}-{host}-{8 random characters}      host: 8 hex digits of sha256(host name)

(a final name is cut to 224 bytes there, so that the whole fits the file system's 255 bytes with any pid). The pid and host
follow the last dot, with the random characters: what precedes it, ``.tmp_{final name}``, is the same on every
run, and ``torch.save`` writes it into the file (its archive's folder name), which stays byte for byte the same;
and the writer holds an exclusive ``flock`` on it (on the descriptor that created it) until the rename.
``remove_stale(folder)`` removes, in ``folder`` only (not below), each temporary file (or folder: the atlas's)
whose name has that form and whose writer is gone:

- the host in the name is this machine's (a writer on another machine sharing the folder is never judged),
- no process of that pid is alive here (``kill(pid, 0)``; a pid taken since by another process keeps the file:
  it is left, never removed wrongly),
- and nobody holds its lock (a non-blocking ``flock`` succeeds: the lock goes with its holder's death, also on
  SIGKILL; it guards a live writer whose pid this process cannot see, in another pid namespace).

Names of another form (also those of versions before this rule, ``.tmp_{name}.{random}``) are left alone.
``atomic.atomic_path`` calls ``remove_stale`` on each folder it writes into, once per process, so a rerun
removes what a killed run left in the folders it writes; stage 1 also calls it on its store when it takes the
store's lock, stage 3 on ``models_disentangled/``, stage 4 on its output folders and its caches at the start
(``sweep``), and the atlas on the folder beside which it writes its temporary folder.
"""
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket

PATTERN = re.compile(r"^\.tmp_(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]{8}$")
_swept = set()  # (pid, folder) already swept by this process


def host_tag():
    """8 hex digits of the host name's sha256 (the same on every process of this machine)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(final_name):
    """The prefix of a temporary name for ``final_name`` (``tempfile`` adds 8 random characters); a final name
    too long for the file system's 255 bytes is cut short in it."""
    tail = f".{os.getpid()}-{host_tag()}-"  # after the last dot: torch.save names its archive by what precedes
    room = 255 - len(".tmp_") - len(".4194304-12345678-") - 8  # the longest pid: the same cut for every pid
    name = final_name.encode()[:room].decode(errors="ignore")
    return f".tmp_{name}{tail}"


def final_name(temp_name):
    """The final file name a temporary name stands for, or None for a name of another form."""
    m = PATTERN.match(temp_name)
    return m.group("name") if m else None


def lock(fd):
    """An exclusive ``flock`` on ``fd``, where the file system has locks (elsewhere the pid rule alone holds)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass


def hold(path):
    """An open descriptor of ``path`` (a file or a folder) with an exclusive ``flock``: the writer keeps it
    until the rename, and closes it then."""
    fd = os.open(path, os.O_RDONLY)
    lock(fd)
    return fd


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:
        return False
    return True


def unheld(path):
    """Whether nobody holds a lock on ``path`` (then this process takes it for a moment)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:  # held; other errors: a file system without locks, where the pid rule alone decides
        return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # drops the lock, if taken


def stale(folder, entry):
    """Whether ``entry`` of ``folder`` is a temporary file of a dead writer of this machine (the rule above)."""
    m = PATTERN.match(entry)
    if not m or m.group("host") != host_tag() or pid_alive(int(m.group("pid"))):
        return False
    return unheld(os.path.join(folder, entry))


def remove_stale(folder):
    """Remove the temporary files (and folders) that dead writers of this machine left in ``folder``; returns
    their names. A folder that does not exist or cannot be written, or an entry that another process removes
    first, is no error."""
    try:
        entries = os.listdir(folder)
    except OSError:  # no such folder, or not one this process may read
        return []
    removed = []
    for entry in sorted(entries):
        if not PATTERN.match(entry) or not stale(folder, entry):
            continue
        path = os.path.join(folder, entry)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(entry)
        except OSError:  # removed by another process first, or a folder this process may not write
            pass
    return removed


def sweep_once(folder):
    """``remove_stale(folder)`` the first time this process writes into ``folder``."""
    key = (os.getpid(), os.path.abspath(folder))
    if key not in _swept:
        _swept.add(key)
        remove_stale(folder)


def sweep(*folders):
    """``remove_stale`` on each folder (a stage's output folders, at its start)."""
    for folder in folders:
        if folder:
            sweep_once(folder)
