"""docs/architecture.md stays true: its how-tos name tests that exist, and the core knows no probe by name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from memwatch.probes.base import BUILTIN_PROBES

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_and_front_ends_name_no_probe() -> None:
    for name in ("session.py", "monitor.py", "jobs.py"):
        tree = ast.parse((ROOT / "src" / "memwatch" / name).read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & set(BUILTIN_PROBES), name


def test_every_how_to_names_a_test_that_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(refs) >= 8
    for path, test in refs:
        source = (ROOT / path).read_text()
        assert test == "" or re.search(rf"^def {test}\(", source, re.M), f"{path}::{test}"
    for module in re.findall(r"`((?:probes|embedders|snapshots|cli)/\w+\.py)`", text):
        assert (ROOT / "src" / "memwatch" / module).is_file() or "<" in module, module


def test_probes_report_only_the_metrics_they_declare(demo_run: dict) -> None:
    from memwatch.history import find_store
    from memwatch.probes.base import probe_class
    from memwatch.store import Store

    with Store(find_store(demo_run["run_dir"]), readonly=True) as store:
        rows = store.metrics(store.runs()[0]["id"])
    seen: dict[str, set[str]] = {}
    for m in rows:
        seen.setdefault(m["probe"], set()).add(m["metric"])
    assert {"membership", "regurgitation"} <= set(seen)
    for probe, metrics in seen.items():
        assert metrics <= set(probe_class(probe).metrics), probe
