"""The error every part of the tool raises for bad input: the bottom of the package (it imports nothing of ours).

``UserError``: a flag, file or folder that cannot be used as given. The stage scripts (``utils.run.cli.run``)
print it as one line, ``error: ...``, and exit with status 2, without a traceback; the message says what is
wrong and what to do. Its subclasses say where it came from: ``utils.files.reading.Damaged`` (a file that
cannot be read as what it should be), ``utils.files.atomic.DiskFull`` (no space left while writing).
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""
