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


def failure_reason(e: BaseException) -> str:
    """How a failure is recorded: one line, a MemwatchError's message or the exception type and message.

    Only the first line of a message is kept: the line that says what went wrong (a traceback-like
    tail from a library adds nothing to a stored reason).

    Example:
        >>> failure_reason(MemwatchError("no images in data/: point --reference at a folder"))
        'no images in data/: point --reference at a folder'
        >>> failure_reason(ValueError("bad shape\\nmore detail")), failure_reason(KeyError())
        ('ValueError: bad shape', 'KeyError')
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, MemwatchError) else f"{type(e).__name__}: {text}" if text else type(e).__name__
