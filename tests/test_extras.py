"""memwatch without its extras: `import memwatch`, the monitor and the pixel path work, and a feature that
needs an extra names it in one line (exit 2). The extras are made unimportable in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.images import write_images

RUNNER = Path(__file__).parent / "support" / "without_extras.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=600)


def test_the_monitor_and_the_pixel_path_need_no_extra(train_holdout, tmp_path: Path) -> None:
    train, holdout = train_holdout
    done = run("monitor", str(train), str(holdout), str(tmp_path / "mw"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "extras loaded: []" in done.stdout
    summary = json.loads((tmp_path / "mw" / "summary.json").read_text())
    assert not summary["failed_probes"] and summary["last_step"] == 8
    assert summary["training_set"]["n"] == 8  # the training-set analysis ran too

    samples = tmp_path / "samples"
    write_images(samples, [0, 1, 50], size=16)
    out = tmp_path / "score.json"
    done = run("cli", "score", str(samples), str(train), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    by_name = {m["sample"]: m for m in doc["matches"]}
    assert by_name["img000.png"]["memorized"] and not by_name["img050.png"]["memorized"]


@pytest.mark.parametrize(
    "args, extra",
    [
        (["--embedder", "clip"], "memwatch[clip]"),
        (["--identity"], "memwatch[faces]"),
        (["--identity", "--matcher", "dlib"], "memwatch[faces]"),
    ],
)
def test_a_feature_that_needs_an_extra_names_it(args, extra, train_holdout, tmp_path: Path) -> None:
    train, _ = train_holdout
    done = run("cli", "score", str(train), str(train), *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and extra in lines[0] and "Traceback" not in done.stderr
