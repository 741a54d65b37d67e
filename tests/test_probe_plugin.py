"""A built-in probe is one file: dropped into the probes package (of a copy of memwatch), it is in the defaults,
run by the monitor and by ``memwatch probe``, stored, drawn, fired on by its rule and listed in the report,
with no edit anywhere else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from support.images import write_images
from support.models import train_unconditional_like

ROOT = Path(__file__).resolve().parents[1]

PROBE_FILE = '''
"""Sample diversity: the mean pairwise distance between the shared samples (a throwaway probe of a test)."""

from dataclasses import dataclass

import torch

from memwatch.probes import Metric, Probe, ProbeResult, ProbeSettings, setting


@dataclass
class PairwiseSettings(ProbeSettings):
    section = "probes.pairwise"
    every: int | None = setting(None, "every this many steps (null: with the shared samples)", min=0, unit="steps")
    floor: float = setting(0.05, "diversity below which the samples collapsed", min=0.0, threshold=True,
                           source="a test of the probe registry")


class PairwiseProbe(Probe):
    """Mean pairwise pixel distance between the shared samples."""

    name = "pairwise"
    Settings = PairwiseSettings
    needs_samples = True
    metrics = (Metric("diversity", role="precursor", label="diversity: mean pairwise distance", threshold="floor"),)
    default_rules = (
        {"name": "samples-diverse", "type": "first", "metric": "pairwise/diversity", "op": ">", "value": 0,
         "severity": "warning", "source": "a test of the probe registry",
         "message": "step {step}: sample diversity {value:.3f}"},
    )
    unmeasured = "no pairwise result: the samples' diversity was not measured"

    def reduce(self, rows, ctx):
        x = ctx.samples.images.flatten(1).double()
        n = x.shape[0]
        mean = float(torch.cdist(x, x).sum() / (n * (n - 1)))
        return ProbeResult(self.name, {"diversity": mean})
'''

MONITOR_JOB = """
import json, sys
from pathlib import Path

import memwatch
from accelerate import Accelerator
from support.models import train

package, data, out = (Path(a) for a in sys.argv[1:4])
assert Path(memwatch.__file__).resolve().is_relative_to(package.resolve()), memwatch.__file__
config = {"sampling": {"every": 2, "num_samples": 4, "inference_steps": 2, "batch_size": 4},
          "probes": {"membership": {"every": 0}}, "cadence": {"adaptive": False}}
acc = Accelerator(cpu=True)
with memwatch.MemorizationMonitor(acc, config, reference=data, output_dir=out) as monitor:
    train(acc, data, 4, monitor=monitor)
print(json.dumps({"events": [e.rule for e in monitor.events], "latest": sorted(monitor.latest)}))
"""

HEADLINE = """
import sys
from memwatch.core.declared import load_run
from memwatch.store import Store
from memwatch.store.history import find_store
from memwatch.views.headline import headline_figure

with Store(find_store(sys.argv[1]), readonly=True) as store:
    fig = headline_figure(load_run(store))
print("\\n".join(t.get_text() for t in fig.legends[0].get_texts()))
"""


def test_a_probe_file_dropped_into_the_package_is_everywhere(tmp_path: Path) -> None:
    package = tmp_path / "site"
    shutil.copytree(ROOT / "src" / "memwatch", package / "memwatch", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (package / "memwatch" / "probes" / "pairwise.py").write_text(textwrap.dedent(PROBE_FILE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), str(ROOT / "tests")])}

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode in (0, 1), proc.stderr[-3000:]
        return proc.stdout

    # the defaults list its settings and its rule
    defaults = yaml.safe_load(run("-m", "memwatch.cli", "config", "--defaults"))
    assert defaults["probes"]["pairwise"] == {"every": None, "floor": 0.05}
    assert "samples-diverse" in [r["name"] for r in defaults["rules"]]

    # the monitor runs it with the other sample probes, stores it, and its rule fires
    data = tmp_path / "train"
    write_images(data, list(range(6)), size=16)
    out = tmp_path / "monitor"
    job = tmp_path / "job.py"
    job.write_text(MONITOR_JOB)
    done = json.loads(run(str(job), str(package), str(data), str(out)).splitlines()[-1])
    assert "pairwise/diversity" in done["latest"] and "samples-diverse" in done["events"]
    legend = run("-c", HEADLINE, str(out)).splitlines()
    assert "diversity: mean pairwise distance" in legend and "diversity threshold 0.05" in legend

    # memwatch probe runs it on checkpoint folders; curves draw it; the report lists it
    run_dir = tmp_path / "run"
    train_unconditional_like(run_dir, data, steps=4, every=2)
    cfg = tmp_path / "mw.yaml"
    cfg.write_text(yaml.safe_dump({"reference": str(data), "probes": {"membership": {"every": 0}},
                                   "sampling": {"num_samples": 4, "inference_steps": 2}}))  # fmt: skip
    assert "probed 2" in run("-m", "memwatch.cli", "probe", str(run_dir), "--config", str(cfg))
    run("-m", "memwatch.cli", "curves", str(run_dir))
    header = (run_dir / "memwatch" / "curves" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "pairwise/diversity" in header
    run("-m", "memwatch.cli", "report", str(run_dir), "--json", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["step"] for p in report["curves"]["metrics"]["pairwise/diversity"]] == [2, 4]
    assert "samples-diverse" in [e["rule"] for e in report["events"]]
    thresholds = {t["name"]: t["source"] for t in report["provenance"]["thresholds"]}
    assert thresholds["probes.pairwise.floor"] == "a test of the probe registry"
    assert "pairwise" in {p["probe"] for p in report["provenance"]["probe_runs"]}
    assert "no-pairwise" not in {x["code"] for x in report["limitations"]}
