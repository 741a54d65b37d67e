"""The built package carries what `memwatch demo` needs, so it runs from an installation too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_demo_and_an_installed_package_finds_it(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("memwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        Path(n).relative_to("memwatch/demo/assets").as_posix() for n in names if n.startswith("memwatch/demo/assets/")
    }
    in_checkout = {
        p.relative_to(ROOT / "assets" / "demo").as_posix() for p in (ROOT / "assets" / "demo").rglob("*") if p.is_file()
    }
    assert shipped == in_checkout  # every image and the licence
    portraits = {n.removeprefix("memwatch/demo/portraits/") for n in names if n.startswith("memwatch/demo/portraits/")}
    assert portraits == {p.name for p in (ROOT / "assets" / "faces").iterdir()}  # photos, licence, manifest
    assert {"memwatch/demo/train_ddpm.py", "memwatch/configs/demo.yaml", "memwatch/configs/demo_faces.yaml"} <= names

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from memwatch.demo.run import demo_files; "
        "f = demo_files(Path.cwd()); print(f.assets, f.script, f.runs, f.faces, f.faces_config, sep='\\n')"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=elsewhere, check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()  # fmt: skip
    assert out == [
        str(site / "memwatch" / "demo" / "assets"),
        str(site / "memwatch" / "demo" / "train_ddpm.py"),
        str(elsewhere / "runs"),
        str(site / "memwatch" / "demo" / "portraits"),
        str(site / "memwatch" / "configs" / "demo_faces.yaml"),
    ]
    assert len(list((site / "memwatch" / "demo" / "assets" / "train").glob("*.png"))) == 8
