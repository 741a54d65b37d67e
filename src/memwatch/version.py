"""memwatch's version (the package's ``__version__``; keep it equal to ``pyproject.toml``'s)."""

__version__ = "0.2.0"
