"""memwatch: watch diffusion models while they train and warn when they begin to memorize.

``import memwatch`` is light: the monitor and heavy optional libraries (open_clip,
facenet-pytorch, torchvision) load only when used.

Example:
    >>> from memwatch import MemorizationMonitor  # doctest: +SKIP
"""

from typing import Any

from memwatch.version import __version__

__all__ = ["MemorizationMonitor", "MemwatchError", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy attributes keep `import memwatch` free of torch/diffusers until something is used.
    if name == "MemorizationMonitor":
        from memwatch.frontends.monitor import MemorizationMonitor

        return MemorizationMonitor
    if name == "MemwatchError":
        from memwatch.errors import MemwatchError

        return MemwatchError
    raise AttributeError(f"module 'memwatch' has no attribute {name!r}")
