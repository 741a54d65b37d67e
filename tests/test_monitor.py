import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from support.models import FAST_MONITOR as FAST
from support.models import accelerate_launch, tiny_unet, train

from memwatch.core.outputs import Output
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.store import Store
from memwatch.views.report.build import build_report


class ListTracker(GeneralTracker):
    """A real accelerate tracker that keeps what it is given in a list."""

    name = "list"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


def test_probing_does_not_change_the_loss_trajectory(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    plain = train(Accelerator(cpu=True), train_dir, 9)
    acc = Accelerator(cpu=True)
    monitor = MemorizationMonitor(acc, FAST, reference=train_dir, holdout=holdout_dir, output_dir=tmp_path / "mw")
    watched = train(acc, train_dir, 9, monitor=monitor)
    assert monitor.session.probed_at == {
        "membership": 9,
        "regurgitation": 8,
        "forecast": 8,
    }  # probes really ran in between
    monitor.close()
    assert monitor.session.probed_at == {
        "membership": 9,
        "regurgitation": 9,
        "forecast": 9,
    }  # close() probes the last step
    assert watched == plain  # bit-identical losses: RNG streams, modes and gradients were restored


def test_samples_are_drawn_as_many_at_once_as_training_puts_through(train_holdout, tmp_path: Path) -> None:
    """sampling.batch_size null: the probes' passes are no larger than training's (4 images a step here)."""
    train_dir, holdout_dir = train_holdout
    cfg = {**FAST, "sampling": {**FAST["sampling"], "batch_size": None}, "probes": {"membership": {"every": 0}}}
    acc = Accelerator(cpu=True)
    monitor = MemorizationMonitor(acc, cfg, reference=train_dir, holdout=holdout_dir, output_dir=tmp_path / "mw")
    passes: list[int] = []
    original_step = monitor.step

    def step(step: int, model, scheduler) -> None:  # hook the model handed over: every pass of the probes
        if not passes and not getattr(model, "_seen", False):
            model._seen = True
            model.register_forward_pre_hook(lambda m, args: passes.append(args[0].shape[0]) if not
                                            torch.is_grad_enabled() else None)  # fmt: skip
        original_step(step, model, scheduler)

    monitor.step = step
    train(acc, train_dir, 4, monitor=monitor)
    monitor.close()
    assert monitor.session.meter.largest_batch == 4
    assert passes and set(passes) == {4, 2}  # 6 samples: 4, then 2 (the fallback, 16, would draw all 6 at once)


def test_results_events_and_tracker_logs(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    tracker = ListTracker()
    acc = Accelerator(cpu=True, log_with=[tracker])
    acc.init_trackers("t")
    cfg = {
        **FAST,
        "rules": [
            {
                "name": "loss-seen",
                "type": "first",
                "metric": "membership/loss_member",
                "op": ">",
                "value": 0,
                "severity": "warning",
                "message": "loss {value:.3f} at {step}",
            }
        ],
    }
    seen = []
    out = tmp_path / "mw"
    with MemorizationMonitor(
        acc, cfg, reference=train_dir, holdout=holdout_dir, output_dir=out, on_event=seen.append
    ) as monitor:
        train(acc, train_dir, 8, monitor=monitor)
    assert [e.rule for e in seen] == ["loss-seen"] and seen[0].step == 3
    assert monitor.last_clean_step is None and monitor.first_alarm_step == 3
    keys = {k for _, values in tracker.logged for k in values}
    assert {"memwatch/membership/mia_auc", "memwatch/regurgitation/mem_fraction", "memwatch/events/loss-seen"} <= keys
    lines = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [(e["rule"], e["step"]) for e in lines] == [("loss-seen", 3)]
    with Store(out / "memwatch.sqlite") as store:
        run = store.runs()[0]["id"]
        steps = sorted({(m["step"], m["probe"]) for m in store.metrics(run)})
        # close() adds the final membership probe at the last step (8).
        assert steps == [
            (3, "membership"),
            (4, "forecast"),
            (4, "regurgitation"),
            (6, "membership"),
            (8, "forecast"),
            (8, "membership"),
            (8, "regurgitation"),
        ]
        assert len(store.matches(run)) == 12 and len(store.events(run)) == 1
        grids = [e for r in store.results(run) for e in r["evidence"]]
    # one evidence grid per regurgitation result, named by run, step and weights (nothing can collide)
    assert len(grids) == 2 and len(set(grids)) == 2 and all((out / g).is_file() for g in grids)
    assert grids[0].startswith("evidence/run001/step00000004-") and grids[0].endswith("-regurgitation.png")
    assert json.loads((out / "summary.json").read_text())["first_alarm_step"] == 3


def test_stop_on_critical_ends_the_loop(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    cfg = {
        **FAST,
        "stop_on": "critical",
        "rules": [
            {
                "name": "always",
                "type": "threshold",
                "metric": "membership/loss_member",
                "op": ">=",
                "value": 0,
                "severity": "critical",
                "message": "stop",
            }
        ],
    }
    acc = Accelerator(cpu=True)
    with MemorizationMonitor(acc, cfg, reference=train_dir, holdout=holdout_dir, output_dir=tmp_path / "m") as mon:
        losses = train(acc, train_dir, 50, monitor=mon)
    assert mon.should_stop and len(losses) == 3


def test_ema_weights_are_probed_and_restored(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    model = tiny_unet()
    ema = EMAModel(tiny_unet(seed=1).parameters())  # deliberately different weights
    before = [p.detach().clone() for p in model.parameters()]
    sched = DDPMScheduler(num_train_timesteps=1000)
    cfg = {**FAST, "probes": {**FAST["probes"], "regurgitation": {"every": 0}, "forecast": {"every": 0}}}
    losses = {}
    for which in ("raw", "ema"):
        acc = Accelerator(cpu=True)
        mon = MemorizationMonitor(
            acc, {**cfg, "weights": which}, reference=train_dir, holdout=holdout_dir, output_dir=tmp_path / which
        )
        mon.step(3, model, sched, ema=ema)
        mon.close()
        with Store(tmp_path / which / "memwatch.sqlite") as store:
            losses[which] = {m["metric"]: m["value"] for m in store.metrics(store.runs()[0]["id"])}["loss_member"]
    assert losses["raw"] != losses["ema"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # 'weights: ema' without an EMA model: recorded as a failed probe, never raised into the training loop
    mon = MemorizationMonitor(
        Accelerator(cpu=True),
        {**cfg, "weights": "ema"},
        reference=train_dir,
        holdout=holdout_dir,
        output_dir=tmp_path / "x",
    )
    assert mon.step(3, model, sched) == []
    summary = mon.close()
    assert [f["probe"] for f in summary["failed_probes"]] == ["membership"]
    assert "pass the EMA model" in summary["failed_probes"][0]["error"]
    with Store(tmp_path / "x" / "memwatch.sqlite") as store:
        (failed,) = store.results(store.runs()[0]["id"])
    assert failed["status"] == "failed" and "pass the EMA model" in failed["error"]


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_checkpoints_saved_with_save_state_are_sightings_of_the_probed_weights(
    train_holdout, tmp_path: Path, weights: str
) -> None:
    train_dir, holdout_dir = train_holdout
    run = tmp_path / "run"
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(run)))
    model = tiny_unet()
    ema = EMAModel(tiny_unet(seed=1).parameters())  # weights unlike the model's: a swap would show
    sched = DDPMScheduler(num_train_timesteps=1000)
    cfg = {**FAST, "weights": weights, "probes": {**FAST["probes"], "membership": {**FAST["probes"]["membership"],
           "every": 2}, "regurgitation": {"every": 0}, "forecast": {"every": 0}}}  # fmt: skip
    mon = MemorizationMonitor(acc, cfg, reference=train_dir, holdout=holdout_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    for step in range(1, 5):
        for p in model.parameters():
            p.data.add_(0.01 * step)  # new weights at every step
        if step >= 2:  # as the diffusers scripts: save before the monitor sees the step
            before = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
            acc.save_state(str(run / f"checkpoint-{step}"))
            saved = safetensors.torch.load_file(run / f"checkpoint-{step}" / "model.safetensors")
            after = acc.unwrap_model(model).state_dict()
            assert all(torch.equal(saved[k], v) and torch.equal(after[k], v) for k, v in before.items())
        mon.step(step, model, sched, ema=ema)
    if weights == "raw":  # the advice a warning would give names the newest probed checkpoint still on disk
        assert mon.session.keep_advice() == f"{run / 'checkpoint-4'} (the last clean checkpoint)"
        shutil.rmtree(run / "checkpoint-4")  # rotated away: the one before it (3 was never probed)
        assert mon.session.keep_advice() == f"{run / 'checkpoint-2'} (the last clean checkpoint)"
        shutil.rmtree(run / "checkpoint-2")
        assert mon.session.keep_advice().endswith("checkpoint-3 (saved by step 4, the last clean probe; "
                                                  "matched by step, not by weights)")  # fmt: skip
    mon.close()
    acc.save_state(str(run / "checkpoint-99"))  # after close(): the hook is gone, nothing recorded
    with Store(run / "memwatch" / "memwatch.sqlite") as store:
        run_id = store.runs()[0]["id"]
        probed = {r["snapshot_id"] for r in store.results(run_id) if r["status"] == "ok"}
        seen = {s["step"]: (s["id"] in probed, sorted((g["kind"], g["step"]) for g in s["sightings"]))
                for s in store.snapshots(run_id)}  # fmt: skip
    if weights == "raw":  # checkpoints 2 and 4 are the probed weights; 3 was saved between probes
        assert seen == {2: (True, [("checkpoint", 2), ("live", 2)]), 3: (False, [("checkpoint", 3)]),
                        4: (True, [("checkpoint", 4), ("live", 4)])}  # fmt: skip
        overall = build_report(run)["verdict"]["overall"]
        assert overall["last_clean_step"] == 4
        assert overall["last_clean_checkpoint"]["path"] == "checkpoint-4"  # relative to the run folder
    else:  # the probes measured the EMA weights, which never change here: one snapshot, seen in every checkpoint
        assert seen == {2: (True, [("checkpoint", 2), ("checkpoint", 3), ("checkpoint", 4), ("live", 2), ("live", 4)])}


def test_a_checkpoint_that_cannot_be_recorded_is_still_saved(train_holdout, tmp_path: Path, caplog) -> None:
    train_dir, holdout_dir = train_holdout
    acc = Accelerator(cpu=True)
    cfg = {**FAST, "weights": "ema", "probes": {**FAST["probes"], "regurgitation": {"every": 0}}}
    mon = MemorizationMonitor(acc, cfg, reference=train_dir, holdout=holdout_dir, output_dir=tmp_path / "mw")
    model = acc.prepare(tiny_unet())
    mon.step(1, model, DDPMScheduler(num_train_timesteps=1000))  # no EMA model passed: every hash fails
    acc.save_state(str(tmp_path / "checkpoint-1"))
    mon.close()
    assert (tmp_path / "checkpoint-1" / "model.safetensors").is_file()
    assert "checkpoint" in caplog.text and "not recorded" in caplog.text and "pass the EMA model" in caplog.text


MP_SCRIPT = Path(__file__).parent / "support" / "mp_monitor_job.py"


@pytest.mark.slow
def test_two_processes_give_the_same_metrics_as_one(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    results = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = accelerate_launch(n, 29500 + n, MP_SCRIPT, str(train_dir), str(holdout_dir), str(out))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with Store(out / "memwatch.sqlite") as store:
            assert store.runs()[0]["info"]["processes"] == n  # n processes really shared the probes
            run = store.runs()[0]["id"]
            results[n] = (
                {(m["probe"], m["metric"]): m["value"] for m in store.metrics(run)},
                [(m["sample"], m["nn1"]) for m in store.matches(run)],
            )
    (m1, nn1), (m2, nn2) = results[1], results[2]
    assert m1.keys() == m2.keys() and len(m1) >= 12
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6, nan_ok=True), key
    assert nn1 == nn2


class Pager(Output):
    """An output of a user's own: it pages on warnings and counts the probed steps; its second page fails."""

    def __init__(self):
        self.steps: list[int] = []
        self.pages: list[str] = []

    def metrics(self, values: dict, step: int) -> None:
        self.steps.append(step)

    def event(self, event) -> None:
        if event.severity != "info":
            self.pages.append(f"{event.rule}@{event.step}")
            if len(self.pages) > 1:
                raise ConnectionError("the pager service is down")


def test_an_output_of_yours_hears_every_step_and_event(train_holdout, tmp_path: Path, caplog) -> None:
    train_dir, _ = train_holdout
    acc = Accelerator(cpu=True)
    pager = Pager()
    rules = [
        {"name": "sampled", "type": "first", "metric": "regurgitation/num_samples", "op": ">", "value": 0,
         "severity": "warning", "message": "step {step}: sampled"},
        {"name": "still-sampled", "type": "threshold", "metric": "regurgitation/num_samples", "op": ">", "value": 0,
         "for": 2, "severity": "critical", "message": "step {step}: sampled again"},
    ]  # fmt: skip
    with MemorizationMonitor(acc, {**FAST, "rules": rules}, reference=train_dir, output_dir=tmp_path / "mw",
                             outputs=[pager]) as monitor:  # fmt: skip
        train(acc, train_dir, 9, monitor=monitor)
    assert pager.steps == [4, 8, 9]  # every probed step (the fixed cadence every 4, and the last at close)
    assert pager.pages == ["sampled@4", "still-sampled@8"]  # the failing second page did not stop training
    assert "output Pager raised ConnectionError: the pager service is down" in caplog.text
    assert [e.rule for e in monitor.events] == ["sampled", "still-sampled"]  # the store and the others had them


class Ticking:
    """A clock that moves by ``dt`` every time it is read: a machine ``dt`` times slower per reading."""

    def __init__(self, dt: float):
        self.dt, self.now = dt, 0.0

    def __call__(self) -> float:
        self.now += self.dt
        return self.now


class SessionLoop:
    """The monitor's in-loop surface over a ProbeSession with a clock of the test's."""

    def __init__(self, session):
        self.session = session

    def step(self, step, model, scheduler):
        return self.session.step(step, model, scheduler)

    @property
    def should_stop(self) -> bool:
        return self.session.should_stop


def test_the_same_seed_probes_the_same_steps_under_any_load(train_holdout, tmp_path: Path) -> None:
    """The cadence budgets counted work, so neither a slower machine nor a slowed-down probe moves a probe."""
    from memwatch.core.config import load_config
    from memwatch.core.session import ProbeSession
    from memwatch.data.refset import load_reference_set

    train_dir, holdout_dir = train_holdout
    config = {
        **FAST,
        "cadence": {"adaptive": True, "budget": 0.3},  # adaptive, under a budget (a generous one: more probes)
        "rules": [
            {
                "name": "any",
                "type": "threshold",
                "metric": "regurgitation/num_samples",
                "op": ">",
                "value": 0,
                "severity": "info",
                "message": "m",
            }
        ],  # fmt: skip
    }

    def run(name: str, dt: float, probe_seconds: float = 0.0) -> tuple[list[int], list[tuple[str, int]], dict]:
        clock = Ticking(dt)
        session = ProbeSession(load_config(config), load_reference_set(train_dir), load_reference_set(holdout_dir),
                               tmp_path / name, clock=clock)  # fmt: skip
        probe = session.probe

        def slowed(*args, **kwargs):  # the probe takes probe_seconds longer on the session's clock
            clock.now += probe_seconds
            return probe(*args, **kwargs)

        session.probe = slowed
        train(Accelerator(cpu=True), train_dir, 40, monitor=SessionLoop(session))
        session.finish()
        with Store(tmp_path / name / "memwatch.sqlite") as store:
            run_id = store.runs()[0]["id"]
            steps = sorted({r["step"] for r in store.results(run_id) if r["probe"] == "regurgitation"})
            events = [(e["rule"], e["step"]) for e in store.events(run_id)]
        summary = session.close()
        return steps, events, summary

    idle, loaded, slow = run("idle", 0.001), run("loaded", 3.0), run("slow-probe", 0.001, probe_seconds=50.0)
    assert idle[:2] == loaded[:2] == slow[:2] and len(idle[0]) >= 3
    # the wall clock still tells what it measured, and the budget is what the cadence kept
    assert slow[2]["probe_overhead"] > 10 * idle[2]["probe_overhead"]
    assert idle[2]["budget_unit"] == "work" and idle[2]["probe_work_share"] == slow[2]["probe_work_share"]
    assert idle[2]["sampled_steps"] == idle[0]  # the summary says where samples were drawn


def test_a_run_sampled_too_rarely_for_a_forecast_says_so(train_holdout, tmp_path: Path, caplog) -> None:
    """A budget that affords samples only at the first probe and the end: the forecast could never have warned,
    and the summary's log line and the report's limitations say so, with what to change."""
    from memwatch.core.config import load_config
    from memwatch.core.session import ProbeSession
    from memwatch.data.refset import load_reference_set

    train_dir, holdout_dir = train_holdout
    config = load_config({**FAST, "cadence": {"adaptive": True, "budget": 0.001}})
    session = ProbeSession(config, load_reference_set(train_dir), load_reference_set(holdout_dir), tmp_path / "mw",
                           clock=Ticking(0.001))  # fmt: skip
    train(Accelerator(cpu=True), train_dir, 40, monitor=SessionLoop(session))
    session.finish()
    with caplog.at_level("WARNING", logger="memwatch"):
        summary = session.close()
    assert summary["sampled_steps"] == [4, 40]  # the granted first probing, and finish()
    assert "samples were drawn at 2 step(s) only (4, 40)" in caplog.text and "cadence.budget" in caplog.text
    report = build_report(tmp_path / "mw")
    limits = {x["code"]: x["message"] for x in report["limitations"]}
    assert "2 step(s) only (4, 40)" in limits["probes-sparse"]
    # torch's thread count shapes the trained weights (its kernels' order of addition): the record keeps it
    assert report["provenance"]["torch_threads"] == torch.get_num_threads()


def test_a_probed_step_samples_once_for_every_sample_probe(train_holdout, tmp_path: Path) -> None:
    """Regurgitation and the forecast read one set of samples: the counted work of a probing is num_samples x
    inference_steps denoiser evaluations (no membership in this config), not twice that."""
    from memwatch.core.config import load_config
    from memwatch.core.session import ProbeSession
    from memwatch.data.refset import load_reference_set

    train_dir, _ = train_holdout
    config = load_config({**FAST, "cadence": {"adaptive": False}, "probes": {"membership": {"every": 0},
                          "forecast": {"every": None}}})  # fmt: skip
    session = ProbeSession(config, load_reference_set(train_dir), None, tmp_path / "once", clock=Ticking(0.01))
    works = []
    probed = session.cadence.probed
    session.cadence.probed = lambda seconds, *, sampled, work=0.0: (works.append(work), probed(seconds, sampled=sampled,
                                                                                            work=work))  # fmt: skip
    train(Accelerator(cpu=True), train_dir, 10, monitor=SessionLoop(session))
    session.finish()
    with Store(tmp_path / "once" / "memwatch.sqlite") as store:
        probes = {r["probe"] for r in store.results(store.runs()[0]["id"])}
    session.close()
    sampling = config.sampling
    assert {"regurgitation", "forecast"} <= probes
    assert works and all(w == sampling.num_samples * sampling.inference_steps for w in works)
