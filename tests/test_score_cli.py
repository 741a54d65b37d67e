import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from support.images import smooth_image, write_images

from memwatch.cli import main


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "train"
    write_images(train, list(range(10)), size=48)
    samples = tmp_path / "samples"
    write_images(samples / "gen", [200, 201, 202], size=48, prefix="s")
    (samples / "copy.png").write_bytes((train / "img004.png").read_bytes())
    Image.fromarray(smooth_image(7, 48)).resize((96, 96)).save(samples / "upscaled_copy.jpg", quality=95)
    return samples, train


def test_score_json_has_promised_shape(tmp_path: Path, capsys) -> None:
    samples, train = _setup(tmp_path)
    out = tmp_path / "out" / "score.json"
    assert main(["score", str(samples), str(train), "--json", str(out), "--top", "3", "--resolution", "32"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) >= {
        "mem_fraction",
        "extracted_fraction",
        "copy_fraction",
        "sim_p50",
        "sim_p95",
        "sim_max",
        "distinct_memorized",
    }
    assert doc["reference"]["n"] == 10 and len(doc["reference"]["manifest_sha256"]) == 64
    assert len(doc["matches"]) == 5
    assert all(set(m) >= {"sample", "nn1", "d1", "d2", "ratio", "similarity"} for m in doc["matches"])
    by_name = {m["sample"]: m for m in doc["matches"]}
    assert set(by_name) == {"copy.png", "upscaled_copy.jpg", "gen/s200.png", "gen/s201.png", "gen/s202.png"}
    assert by_name["copy.png"]["nn1"] == "img004.png" and by_name["copy.png"]["memorized"]
    assert by_name["upscaled_copy.jpg"]["nn1"] == "img007.png" and by_name["upscaled_copy.jpg"]["memorized"]
    assert not by_name["gen/s200.png"]["memorized"]
    assert doc["metrics"]["mem_fraction"] == 0.4 and doc["metrics"]["distinct_memorized"] == 2
    printed = capsys.readouterr().out
    assert "mem_fraction" in printed and "copy.png" in printed


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    samples, train = _setup(tmp_path)
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing"), str(train)], "SAMPLES_DIR"),
        ([str(samples), str(tmp_path / "empty")], "has no usable image"),
    ]
    for args, needle in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "memwatch.cli", "score", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
