"""The package keeps the shape docs/architecture.md draws: its layers (import-linter contracts), no import
cycles, a core that knows no probe by name, and how-tos that name tests and files that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from memwatch.core.probe import ROLES
from memwatch.core.registry import builtin_probes

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "memwatch"


def test_the_layer_contracts_hold() -> None:
    # pyproject.toml's [tool.importlinter] contracts, checked by import-linter itself
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_module_imports_itself_through_others() -> None:
    import grimp

    graph = grimp.build_graph("memwatch", exclude_type_checking_imports=True)
    cycles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.chain_exists(importer=imported, imported=module)
        }
    )
    assert cycles == []


#: Words allowed where they are not the probe: configs of memwatch before 0.2 set the shared samples under
#: probes.regurgitation; a run's "identity" (its folder and data) is a column of the store.
LEGACY = {("src/memwatch/core/config.py", "regurgitation"), ("src/memwatch/store/database.py", "identity")}


def test_the_core_views_and_front_ends_name_no_probe() -> None:
    names = {cls.name for cls in builtin_probes()}
    folders = [PACKAGE / "core", PACKAGE / "frontends", PACKAGE / "store"]
    files = [p for folder in folders for p in folder.rglob("*.py")] + [PACKAGE / "views" / "headline.py"]
    assert len(files) > 15
    for path in files:
        tree = ast.parse(path.read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        keyed = {s for s in literals if "/" in s and s.split("/", 1)[0] in names}  # "regurgitation/mem_fraction"
        # a metric role ("forecast") and a rule type share words with probe names: they are not probes
        named = {n for n in literals & names - set(ROLES) if (str(path.relative_to(ROOT)), n) not in LEGACY}
        assert not named and not keyed, (path.relative_to(ROOT), named, keyed)


def test_every_how_to_names_a_test_and_a_file_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(refs) >= 8
    for path, test in refs:
        source = (ROOT / path).read_text()
        assert test == "" or re.search(rf"^def {test}\(", source, re.M), f"{path}::{test}"
    modules = re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", text)
    assert len(modules) >= 20
    for module in modules:
        if module.startswith(("tests/", "scripts/")):
            continue
        assert (PACKAGE / module).is_file(), module


def test_probes_report_only_the_metrics_they_declare(demo_run: dict) -> None:
    from memwatch.core.registry import probe_class
    from memwatch.store import Store
    from memwatch.store.history import find_store

    with Store(find_store(demo_run["run_dir"]), readonly=True) as store:
        rows = store.metrics(store.runs()[0]["id"])
    seen: dict[str, set[str]] = {}
    for m in rows:
        seen.setdefault(m["probe"], set()).add(m["metric"])
    assert {"membership", "regurgitation"} <= set(seen)
    for probe, metrics in seen.items():
        assert metrics <= set(probe_class(probe).declared()), probe
