"""What every memwatch chart shares: an Agg figure outside pyplot, matplotlib's default style, and PNG bytes
that are the same on every install (used by :mod:`~memwatch.views.curves`, :mod:`~memwatch.views.headline`
and the report)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
PNG_METADATA = {"Software": None}  # no matplotlib version in the file: identical bytes across installs


def new_figure(width_in: float, height_in: float) -> Figure:
    """An Agg figure outside pyplot (no global state, no GUI backend).

    Example:
        >>> new_figure(4.0, 3.0).get_size_inches().tolist()
        [4.0, 3.0]
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def default_style() -> Any:
    """matplotlib's default style as a context, so a user's matplotlibrc cannot change the output."""
    import matplotlib.style

    return matplotlib.style.context("default")


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, without a software stamp."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    return buf.getvalue()
