"""Print a report's HTML page to PDF with headless Chromium (``--print-to-pdf``).

The page has no script and loads nothing (see :mod:`memwatch.views.report.html`), so printing needs no
network; the flags below also switch off every background service Chromium would otherwise contact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from memwatch.errors import MemwatchError
from memwatch.output import ensure_folder

#: Browser executables tried in order (Debian's package installs ``chromium``).
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Seconds a print may take; a report of a few MB prints in a few seconds on 2 cores.
PRINT_TIMEOUT_S = 120.0
QUIET_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)
# No date or file path printed in the page margins. Only for --print-to-pdf: with this Chromium
# (156) the flag makes renderers of DevTools-driven pages crash.
PDF_FLAGS = ("--no-pdf-header-footer",)


def find_browser() -> str | None:
    """Path of a Chromium-family browser, or None.

    ``MEMWATCH_CHROMIUM`` (a path) wins over the names in :data:`BROWSERS` searched on ``PATH``.

    Example:
        >>> find_browser()  # doctest: +SKIP
        '/usr/bin/chromium'
    """
    env = os.environ.get("MEMWATCH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_flags(user_data_dir: str | Path) -> list[str]:
    """Flags for a headless run with a fresh profile and no background traffic.

    Chromium refuses to start as root with its sandbox on; root (containers, CI) therefore gets
    ``--no-sandbox``. The page it opens is our own, without scripts.

    Args:
        user_data_dir: a fresh, empty profile folder (nothing of the user's profile is read).

    Example:
        >>> "--headless" in browser_flags("/tmp/profile")
        True
    """
    flags = [*QUIET_FLAGS, f"--user-data-dir={user_data_dir}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")
    return flags


def write_pdf(html_path: str | Path, pdf_path: str | Path) -> Path:
    """Print ``html_path`` to ``pdf_path`` through headless Chromium.

    Args:
        html_path: the report page (from :func:`memwatch.views.report.write_report`).
        pdf_path: where the PDF goes (parent folders are created).

    Returns:
        ``pdf_path``.

    Raises:
        MemwatchError: no Chromium found, the page is missing, or printing failed.

    Example:
        >>> write_pdf("out/memwatch/report.html", "out/memwatch/report.pdf")  # doctest: +SKIP
    """
    html_path, pdf_path = Path(html_path), Path(pdf_path)
    if not html_path.is_file():
        raise MemwatchError(f"report page {html_path} does not exist: write the HTML report first")
    browser = find_browser()
    if browser is None:
        raise MemwatchError(
            "--pdf needs headless Chromium and none was found (chromium, google-chrome; or set MEMWATCH_CHROMIUM): "
            "install it (Debian: apt-get install chromium) or leave out --pdf and print the HTML page"
        )
    if pdf_path.is_dir():
        raise MemwatchError(f"--pdf {pdf_path} is a folder: pass a file path")
    ensure_folder(pdf_path.parent, "the folder of --pdf")
    tmp = pdf_path.with_name(f".{pdf_path.name}.tmp")
    with tempfile.TemporaryDirectory(prefix="memwatch-chromium-") as profile:
        cmd = [browser, *browser_flags(profile), *PDF_FLAGS, f"--print-to-pdf={tmp}", html_path.resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PRINT_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise MemwatchError(f"{browser} did not print {html_path} within {PRINT_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MemwatchError(f"{browser} could not print {html_path} to PDF (exit {proc.returncode}): {detail[0]}")
    try:
        os.replace(tmp, pdf_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MemwatchError(f"cannot write --pdf {pdf_path} ({e.strerror or e}): pass a writable file path") from None
    return pdf_path
