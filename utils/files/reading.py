"""Reading the files the stages wrote, one helper per format; a damaged or unreadable file is one line.

Every helper raises ``Damaged`` (a UserError, and a ValueError for callers that treat an unreadable file as
"not there yet") with the path, what is wrong and what to do, instead of the reader's traceback:

- ``read_json``: a truncated or garbled JSON file (``JSONDecodeError``, bytes that are not UTF-8);
- ``open_npy``: an ``.npy`` array as a read-only memory map, after checking its header (a garbled header, an
  object array: never unpickled) and its length (a file cut short is refused before numpy maps it);
- ``load_npz``: an ``.npz`` archive (a truncated one is ``BadZipFile`` to numpy), read whole into memory;
- ``load_state_dict``: a PyTorch file read with ``weights_only=True`` (a ``.npy``, an ``.npz``, a 0-byte file
  or a pickle of other objects is named as such; torch's own text would suggest ``weights_only=False``).
"""
import json
import os
import zipfile

import numpy as np

from utils.errors import UserError

REWRITE = "delete it and rerun the stage that wrote it"


class Damaged(UserError, ValueError):
    """A file that cannot be read as what it should be: one line with its path and what to do."""

    def __init__(self, path, problem, remedy=None):
        super().__init__(f"{path}: {problem}; {remedy or REWRITE}")
        self.path, self.problem = path, problem


def read_json(path, remedy=None):
    """The JSON value in ``path`` (NaN and Infinity tokens are read, as older versions wrote them). Damaged for a
    file that is not complete JSON; OSError (a missing file, ...) passes through."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        size = os.path.getsize(path)
        what = "empty (0 bytes)" if size == 0 else f"not complete JSON ({e.msg} at line {e.lineno} column {e.colno}" \
                                                      f" of {size} bytes: cut short or garbled)"
        raise Damaged(path, what, remedy) from None
    except UnicodeDecodeError:
        raise Damaged(path, "not a text file (bytes that are not UTF-8)", remedy) from None


def npy_layout(path, remedy=None):
    """(shape, dtype, data offset, expected file size) from an ``.npy`` file's header; Damaged for a garbled
    header, a Fortran-ordered or object array."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except (ValueError, SyntaxError, TypeError, KeyError, EOFError, OSError) as e:
            size = os.path.getsize(path)
            raise Damaged(path, f"not an .npy array file (its header is garbled: {str(e).splitlines()[0][:80]}; "
                                f"{size} bytes)", remedy) from None
        offset = f.tell()
    if dtype.hasobject:
        raise Damaged(path, f"holds Python objects ({dtype}), not numbers; it is never unpickled", remedy)
    if fortran:
        raise Damaged(path, "holds a Fortran-ordered array, not one the stages write", remedy)
    return tuple(shape), dtype, offset, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def open_npy(path, shape=None, dtype=None, remedy=None):
    """``path`` as a read-only memory map (numpy.load(..., mmap_mode='r')), its header and length checked first:
    Damaged for a garbled header, an object array, a file shorter or longer than its header says, or (when
    given) another ``shape`` or ``dtype``."""
    found, dt, _, expected = npy_layout(path, remedy)
    size = os.path.getsize(path)
    if size != expected:
        raise Damaged(path, f"{'cut short' if size < expected else 'longer than its header says'}: {size} bytes, "
                            f"its header ({found} {dt}) needs {expected}", remedy)
    if shape is not None and tuple(shape) != found:
        raise Damaged(path, f"holds shape {found}, not {tuple(shape)}", remedy)
    if dtype is not None and np.dtype(dtype) != dt:
        raise Damaged(path, f"holds {dt}, not {np.dtype(dtype)}", remedy)
    return np.load(path, mmap_mode="r")


def load_npz(path, remedy=None):
    """{name: array} of an ``.npz`` archive, read whole (no pickles); Damaged for one cut short or garbled, or a
    file that is not an archive."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        what = "a single .npy array" if head == b"\x93NUMPY" else "cut short or garbled"
        raise Damaged(path, f"not a complete .npz archive ({what}, {os.path.getsize(path)} bytes)", remedy)
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as e:
        text = str(e).splitlines()[0][:80] if str(e) else ""
        if "allow_pickle" in text:
            text = "it holds Python objects, never unpickled"
        raise Damaged(path, f"not a complete .npz archive ({type(e).__name__}: {text})", remedy) from None


def _kind_of(path):
    """What a file that torch cannot read looks like: '.npy array', '.npz archive', 'empty' or None."""
    if os.path.getsize(path) == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return "a numpy .npy array, not a PyTorch file"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
        if members and all(m.endswith(".npy") for m in members):
            return "a numpy .npz archive, not a PyTorch file"
    return None


def load_state_dict(path, what="checkpoint", remedy=None):
    """The object saved in the PyTorch file ``path``, read with ``weights_only=True`` (tensors and plain
    containers only, never code); Damaged for a file that is not one (cut short, a numpy file, other
    objects)."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for a bad file; each is one line here
        if isinstance(e, OSError) and not os.path.isfile(path):
            raise
        kind = _kind_of(path)
        if kind is None:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if "weights_only" in str(e) or type(e).__name__ == "UnpicklingError":
                kind = "holds objects other than tensors and plain containers (never unpickled here)"
            else:
                kind = f"cut short or garbled ({type(e).__name__}: {first[:100]})"
        raise Damaged(path, f"cannot be read as a {what}: {kind}", remedy) from None
