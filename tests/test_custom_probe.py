"""A probe, an embedder and an in-loop front-end, each defined in this file and plugged into memwatch
without editing any memwatch source file (docs/architecture.md: "where each kind of change goes")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers import DDPMScheduler
from support.images import write_images
from support.models import tiny_unet, train, train_unconditional_like

from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.core.probe import Probe, ProbeContext, ProbeResult, ProbeSettings
from memwatch.core.session import ProbeSession
from memwatch.data.refset import load_reference_set
from memwatch.embedders.base import Embedder
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.settings import setting
from memwatch.snapshots import load_snapshot
from memwatch.store import Store
from memwatch.store.history import find_store, load_history

OFF = {"membership": {"every": 0}, "regurgitation": {"every": 0}}


@dataclass
class WeightNormSettings(ProbeSettings):
    section = "probes.weight_norm"
    every: int = setting(2, "run every this many training steps (0: off)", min=0, unit="steps")
    scale: float = setting(1.0, "multiplies the norm", min=0.0)


class WeightNormProbe(Probe):
    """The UNet's weight norm: a sampling-free probe whose parameters are shared out across processes."""

    name = "weight_norm"
    Settings = WeightNormSettings
    metrics = ("norm", "tensors")
    default_rules = (
        {"name": "weights-exist", "type": "first", "metric": "weight_norm/norm", "op": ">", "value": 0,
         "severity": "warning", "source": "a test", "message": "step {step}: weight norm {value:.3f}"},
    )  # fmt: skip

    def compute(self, ctx: ProbeContext) -> list[dict[str, Any]]:
        params = sorted(ctx.parts.unet.named_parameters(), key=lambda kv: kv[0])
        return [{"item": n, "sq": float(p.detach().double().pow(2).sum())} for n, p in ctx.workers.share(params)]

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult:
        norm = self.settings.scale * math.sqrt(sum(r["sq"] for r in rows))
        return ProbeResult(self.name, {"norm": norm, "tensors": float(len(rows))}, items=rows)


def weight_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


class MeanColourEmbedder(Embedder):
    """Each image as its mean colour: an embedder in one class."""

    name = "mean-colour"
    builtin_copy_threshold = 0.99
    copy_threshold_source = "a test"

    def __init__(self, resolution: int = 16):
        self.resolution = resolution
        self.default_copy_threshold = self.builtin_copy_threshold

    @classmethod
    def from_settings(cls, settings: Any, default_resolution: int | None = None) -> MeanColourEmbedder:
        return cls(settings.resolution or default_resolution or 16)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "resolution": self.resolution}

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))

    def pairwise_distance(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return torch.cdist(query.double(), reference.double()).float()

    def similarity(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance


@pytest.fixture
def train_images(tmp_path: Path) -> Path:
    write_images(tmp_path / "train", list(range(6)), size=16)
    return tmp_path / "train"


def test_a_probe_instance_runs_in_the_monitor_and_drives_a_rule(train_images: Path, tmp_path: Path) -> None:
    acc = Accelerator(cpu=True)
    out = tmp_path / "mw"
    events = []
    probe = WeightNormProbe(every=2, scale=2.0)
    with MemorizationMonitor(
        acc,
        # no time budget: a 5-step run is too short to measure one, and the test checks the fixed cadence
        {"probes": OFF, "cadence": {"budget": None}},
        reference=train_images,
        output_dir=out,
        probes=[probe],
        on_event=events.append,
    ) as monitor:
        train(acc, train_images, 5, monitor=monitor)
        assert monitor.session.probes[-1] is probe  # the instance itself is used
    with Store(find_store(out)) as store:
        history = load_history(store)
    norms = history.metrics["weight_norm/norm"]
    assert list(norms) == [2, 4, 5]  # cadence every 2, and the last step at close
    assert history.metrics["weight_norm/tensors"][2] == len(list(tiny_unet().parameters()))
    assert all(v > 0 for v in norms.values()) and norms[2] != norms[4]
    # the probe's default rule came with it and fired once, at the first probe
    assert [(e.rule, e.step) for e in events] == [("weights-exist", 2)]
    assert history.config["probes"]["weight_norm"] == {"every": 2, "scale": 2.0}


def test_a_probe_named_in_the_config_runs_in_memwatch_probe_curves_and_report(
    train_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    train_unconditional_like(run_dir, train_images, steps=4, every=2)
    cfg = tmp_path / "mw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "reference": str(train_images),
                "custom_probes": [f"{__name__}:WeightNormProbe"],
                "probes": {**OFF, "weight_norm": {"every": 1}},
            }
        )
    )
    assert main(["probe", str(run_dir), "--config", str(cfg), "--fail-on", "warning"]) == 1  # the rule fired
    # the final pipeline holds checkpoint-4's weights: seen again, not measured twice
    assert "probed 2, already done 1" in capsys.readouterr().out
    with Store(find_store(run_dir)) as store:
        history = load_history(store)
    by_snapshot = {(r["step"], r["kind"]): r["value"] for r in history.metric_rows if r["metric"] == "norm"}
    expected = weight_norm(load_snapshot(run_dir / "checkpoint-2").parts.unet)
    assert by_snapshot[(2, "checkpoint")] == pytest.approx(expected, rel=1e-12)
    assert set(by_snapshot) == {(2, "checkpoint"), (4, "checkpoint")}
    sightings = [(g["step"], g["kind"]) for s in history.snapshots for g in s["sightings"]]
    assert sorted(sightings) == [(2, "checkpoint"), (4, "checkpoint"), (4, "final")]
    assert [e["rule"] for e in history.events] == ["weights-exist"]

    assert main(["probe", str(run_dir), "--config", str(cfg)]) == 0  # nothing new
    assert "probed 0, already done 3" in capsys.readouterr().out  # without run_name: the same run

    assert main(["curves", str(run_dir)]) == 0
    header = (run_dir / "memwatch" / "curves" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "weight_norm/norm" in header and "weight_norm/tensors" in header

    assert main(["report", str(run_dir), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["step"] for p in report["curves"]["metrics"]["weight_norm/norm"]] == [2, 4]
    assert report["events"][0]["rule"] == "weights-exist"
    sources = {t["name"]: t["source"] for t in report["provenance"]["thresholds"]}
    assert sources["weights-exist"] == "a test"
    page = (run_dir / "memwatch" / "report.html").read_text()
    assert "<h3>weight_norm</h3>" in page and "weights-exist" in page


def test_an_embedder_is_one_class(train_images: Path, tmp_path: Path) -> None:
    config = load_config(
        {
            "embedder": {"name": f"{__name__}:MeanColourEmbedder"},
            "probes": {"membership": {"every": 0}, "regurgitation": {"num_samples": 3, "inference_steps": 2}},
        }
    )
    session = ProbeSession(config, load_reference_set(train_images), None, tmp_path / "out")
    session.probe(1, tiny_unet(), DDPMScheduler())
    with Store(find_store(tmp_path / "out")) as store:
        history = load_history(store)
    assert {m["sample"] for m in history.matches} == {"seed-000000", "seed-000001", "seed-000002"}
    assert all(0 <= m["d1"] <= math.sqrt(3) for m in history.matches)  # distances between mean colours
    session.close()


class PlainLoop:
    """A second in-loop front-end, for a plain PyTorch loop without accelerate: a few lines over the session."""

    def __init__(self, config: Any, reference: Path, output_dir: Path):
        self.session = ProbeSession(load_config(config), load_reference_set(reference), None, output_dir)

    def step(self, step: int, model: torch.nn.Module, scheduler: Any) -> list:
        return self.session.step(step, model, scheduler)

    def close(self) -> dict:
        self.session.finish()
        return self.session.close()


def test_a_second_in_loop_front_end_is_a_few_lines(train_images: Path, tmp_path: Path) -> None:
    loop = PlainLoop({"probes": {**OFF, "regurgitation": {"every": 2, "num_samples": 2, "inference_steps": 2}}},
                     train_images, tmp_path / "plain")  # fmt: skip
    model, scheduler = tiny_unet(), DDPMScheduler()
    for step in range(1, 4):
        with torch.no_grad():  # a training step changes the weights (the same weights are measured once)
            next(model.parameters()).add_(0.01)
        loop.step(step, model, scheduler)
    summary = loop.close()
    assert summary["last_step"] == 3
    with Store(find_store(tmp_path / "plain")) as store:
        assert sorted(load_history(store).metrics["regurgitation/mem_fraction"]) == [2, 3]
