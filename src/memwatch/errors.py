"""The one exception type that reaches users as a single line.

Anything the user can fix (a bad folder, a missing weights file, a wrong setting) raises
:class:`MemwatchError` with a message that names the file or setting and what to do. The CLI
prints the message and exits with status 2; library users catch it like any exception.
"""


class MemwatchError(Exception):
    """A problem with the user's input or environment, phrased for the user.

    Example:
        >>> raise MemwatchError("reference folder data/ has no images: point --reference at ...")
        Traceback (most recent call last):
        ...
        memwatch.errors.MemwatchError: reference folder data/ has no images: point --reference at ...
    """


class ProbeUnavailable(MemwatchError):
    """A probe cannot run on this snapshot with this data (e.g. no captions to prompt with).

    The probe is recorded as failed with this message for the snapshot; the other probes run.
    """
