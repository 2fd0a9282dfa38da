r"""What the atlas puts into HTML from the files it reads: every value passes ``shown``, every link ``url``.

The result files (summaries, info files, concepts and candidates files) and their names may come from anyone
who shares a results folder, so nothing read from them reaches a page as markup:

- ``shown(v, digits)``: a finite number (int or float, not bool) is written as a number (``digits``
  significant digits, or as Python writes it with ``digits=None``); NaN and ±inf as "—"; None as nothing;
  anything else (text, a list, an object) as its text with ``& < > " '`` escaped, so it reads as text in an
  element and in a quoted attribute alike.
- ``url(href, depth)``: a link of a page ``depth`` folders below the atlas's top (the index: 0, a channel's
  page: 2) to a file of the atlas: percent-quoted (so no ``javascript:`` or other scheme survives: ``:``
  becomes ``%3A``), then escaped as ``shown`` does; None (no link) for an absolute path, a scheme, or a path
  that leaves the atlas (more ``..`` than ``depth``).
"""
import math
import posixpath
from html import escape
from numbers import Real
from urllib.parse import quote

NOT_FINITE = "—"


def finite(v):
    """Whether ``v`` is a finite real number that a float holds (bool is not a number here)."""
    if not isinstance(v, Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond a float's range (JSON allows any number of digits)
        return False


def shown(v, digits=3):
    """The HTML of one value: a finite number, "—" for NaN, ±inf or a number beyond a float's range, "" for
    None, else escaped text."""
    if v is None:
        return ""
    if isinstance(v, Real) and not isinstance(v, bool):
        if not finite(v):
            return NOT_FINITE
        return str(v) if digits is None else f"{v:.{digits}g}"
    return escape(str(v))


def sort_key(v):
    """A number's ``data-sort`` text: as a float (``repr``), or the value's text where no float holds it."""
    try:
        return repr(float(v))
    except OverflowError:
        return str(v)


def inside(href, depth):
    """Whether the relative link ``href`` of a page ``depth`` folders deep stays inside the atlas."""
    if not isinstance(href, str) or not href or href.startswith("/") or "\\" in href:
        return False
    parts = posixpath.normpath(posixpath.join(*(["d"] * depth), href)).split("/") if depth else \
        posixpath.normpath(href).split("/")
    return parts[0] != ".." and ":" not in href.split("/")[0]


def url(href, depth):
    """An href/src attribute's value (quoted and escaped), or None where ``href`` would leave the atlas."""
    if not inside(href, depth):
        return None
    return shown(quote(href))
