#!/usr/bin/env python
"""Benchmark: what the monitor at default settings costs on the demo recipe, and where a probe's time goes.

Trains the demo recipe (``scripts/train_ddpm.py`` with :data:`memwatch.demo.run.DEMO_TRAINING_ARGS`, on the
demo's images, same seed) with probes disabled and with memwatch's default settings, alternated — off,
default, off, default, off — each run in its own Python process, so that warm-up, caches and machine drift
favour neither arm. With probes disabled the monitor is still called every step, so the difference is the
probing itself. Each default run is compared with the mean of the two disabled runs beside it (a linear
drift cancels), and the overhead reported is the mean of those comparisons, beside the spread of the
disabled runs (how far the machine itself drifted). The same comparison is made on each run's CPU time
(the process's user and system time, all threads), which the machine's other tenants move less than the
wall clock, beside the share of the machine's CPU time the host reported stolen during the run.

It also prints the monitor's own measures (``probe_overhead``: probe time / training time on the wall clock;
``probe_work_share``: probe work / training work in denoiser evaluations, what the cadence budgets), where the
probe time goes, and whether the default runs probed the same steps and raised the same events: they must,
as the cadence counts work, not time. Run it with the machine otherwise idle.

``--concurrent`` runs each pair's two arms at the same time instead, each in its own process pinned to its own
core with one torch thread, the arms swapping cores from pair to pair: whatever the machine does to its speed,
it does to both arms at once, so the drift between runs (7-12% within a sitting on the 2-core machine the
figures in ``docs/benchmarks.md`` come from) drops out of the comparison. The arm that finishes first keeps its
core busy until the other is done, so that neither runs its last steps alone. Each pair's overhead is the
default run's wall time against its own disabled run's; the mean comes with its 95% interval over the pairs.

    python scripts/bench_monitor.py [--steps N] [--pairs 2] [--concurrent] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = {
    "off": {"run_name": "bench-off", "sampling": {"every": 0}, "probes": {"membership": {"every": 0}}},
    "default": {"run_name": "bench-default"},
}
PHASES = ("sampling", "reference_embedding", "embedding", "search", "membership", "store")


def one_run(arm: str, out: Path, steps: int, cpu: int | None = None) -> dict[str, Any]:
    """Train the demo recipe once with ``arm``'s config (in this process); its wall time, summary and record.

    Args:
        arm: a key of :data:`ARMS`.
        out: the run's folder.
        steps: training steps.
        cpu: pin this process to that core with one torch thread (``--concurrent``); None: the machine's default.
    """
    import torch
    import yaml

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
        torch.set_num_threads(1)

    from memwatch.demo.run import DEMO_TRAINING_ARGS, _load_script, find_checkout
    from memwatch.store import STORE_NAME, Store

    root = find_checkout()
    script = _load_script(root / "scripts" / "train_ddpm.py")
    out.mkdir(parents=True, exist_ok=True)
    config = out / "memwatch.yaml"
    config.write_text(yaml.safe_dump(ARMS[arm]))
    argv = ["--train-data", str(root / "assets/demo/train"), "--holdout-data", str(root / "assets/demo/holdout"),
            "--output-dir", str(out / "run"), "--memwatch-config", str(config), "--steps", str(steps),
            *DEMO_TRAINING_ARGS]  # fmt: skip
    stolen0, t0, cpu0 = _steal(), time.perf_counter(), time.process_time()
    summary = script.main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stolen = [b - a for a, b in zip(stolen0, _steal(), strict=True)]
    probed: dict[str, list[int]] = {}
    events: list[list[Any]] = []
    store_path = out / "run" / "memwatch" / STORE_NAME
    if store_path.is_file():
        with Store(store_path, readonly=True) as store:
            run_id = store.runs()[0]["id"]
            for r in store.results(run_id):
                if r["kind"] == "live":
                    probed.setdefault(r["probe"], []).append(r["step"])
            events = [[e["rule"], e["step"]] for e in store.events(run_id)]
    keep = ("probe_overhead", "probe_work_share", "budget_unit", "timings", "onset_step", "at_risk_step",
            "first_alarm_step", "last_clean_step")  # fmt: skip
    return {"arm": arm, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "steal": round(stolen[0] / stolen[1], 4) if stolen[1] else None,
            "summary": {k: summary.get(k) for k in keep},
            "probed": {k: sorted(v) for k, v in sorted(probed.items())}, "events": events}  # fmt: skip


def _steal() -> tuple[int, int]:
    """The machine's stolen and total CPU time so far (``/proc/stat``, in ticks; zeros where it is not there):
    on a virtual machine, time the host gave to others, which slows a run's wall clock but not its CPU time."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def beside(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Each default run's ``key`` against the mean of the two disabled runs beside it (a linear drift cancels)."""
    out = []
    for i in range(1, len(runs) - 1, 2):
        off = (runs[i - 1][key] + runs[i + 1][key]) / 2
        out.append((runs[i][key] - off) / off)
    return out


def in_own_process(arm: str, out: Path, steps: int) -> dict[str, Any]:
    """:func:`one_run` in a fresh Python process (nothing warm is shared between runs)."""
    result = out / "result.json"
    cmd = [sys.executable, __file__, "--one", arm, "--out", str(out), "--steps", str(steps)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def side_by_side(out: Path, steps: int, cores: dict[str, int]) -> list[dict[str, Any]]:
    """Both arms at once, each in a fresh process pinned to ``cores[arm]``; their records, in ``ARMS`` order.

    A child that has finished keeps its core busy (:func:`keep_busy`) until both have, so the other's last steps
    run beside the same load as its first ones.
    """
    done = out / "both-done"
    children = {}
    for arm, cpu in cores.items():
        run_out = out / arm
        run_out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--one", arm, "--out", str(run_out), "--steps", str(steps),
               "--cpu", str(cpu), "--hold", str(done)]  # fmt: skip
        children[arm] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {arm: out / arm / "result.json" for arm in cores}
    while not all(r.is_file() for r in results.values()):
        if any(c.poll() not in (None, 0) for c in children.values()):
            break  # a child failed: release the other and report below
        time.sleep(0.5)  # polling a child process: nothing here can pass a clock in
    done.touch()
    for arm, child in children.items():
        if child.wait() != 0:
            raise RuntimeError(f"the {arm} run failed (exit {child.returncode}); run it alone to see why")
    return [json.loads(results[arm].read_text()) | {"cpu": cores[arm]} for arm in ARMS]


def keep_busy(until: Path) -> None:
    """Keep this process's core busy with matrix products until ``until`` exists (the arm that finished first)."""
    import torch

    a = torch.randn(256, 256)
    while not until.exists():
        for _ in range(20):
            a = torch.tanh(a @ a)


def pair_interval(overheads: list[float]) -> tuple[float, float]:
    """The 95% interval of the mean of per-pair overheads (Student's t; the pairs are independent draws).

    Args:
        overheads: one relative overhead per pair.

    Example:
        >>> lo, hi = pair_interval([0.02, 0.03, 0.025, 0.028])
        >>> round(lo, 4), round(hi, 4)
        (0.0188, 0.0327)
    """
    from scipy import stats

    n = len(overheads)
    mean = statistics.fmean(overheads)
    if n < 2:
        return mean, mean
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(overheads) / n**0.5
    return mean - half, mean + half


def main(argv: list[str] | None = None) -> int:
    from memwatch.demo.run import DEMO_STEPS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--pairs", type=int, default=2, help="default runs, each between two disabled runs")
    p.add_argument("--json", default=None, help="write every run's record and the summary here")
    p.add_argument("--concurrent", action="store_true", help="each pair's arms at once, one core each")
    p.add_argument("--one", choices=sorted(ARMS), help=argparse.SUPPRESS)  # a child run
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--hold", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        record = one_run(args.one, Path(args.out), args.steps, args.cpu)
        (Path(args.out) / "result.json").write_text(json.dumps(record))
        if args.hold:
            keep_busy(Path(args.hold))
        return 0
    if args.concurrent:
        return concurrent(args.pairs, args.steps, args.json)

    order = ["off", *(["default", "off"] * args.pairs)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, arm in enumerate(order):
            runs.append(in_own_process(arm, Path(tmp) / f"{i}-{arm}", args.steps))
            print(f"run {i + 1}/{len(order)}: {arm}, {runs[-1]['wall_s']:.1f} s", flush=True)
    offs = [r["wall_s"] for r in runs if r["arm"] == "off"]
    overheads, cpu_overheads = beside(runs, "wall_s"), beside(runs, "cpu_s")
    defaults = [r for r in runs if r["arm"] == "default"]
    reproduced = all(d["probed"] == defaults[0]["probed"] and d["events"] == defaults[0]["events"] for d in defaults)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "steps": args.steps,
        "overhead": round(statistics.fmean(overheads), 4),
        "overheads": [round(o, 4) for o in overheads],
        "off_spread": round((max(offs) - min(offs)) / statistics.fmean(offs), 4),
        "cpu_overhead": round(statistics.fmean(cpu_overheads), 4),
        "cpu_overheads": [round(o, 4) for o in cpu_overheads],
        "steal": [r["steal"] for r in runs],
        "probe_overhead": [d["summary"]["probe_overhead"] for d in defaults],
        "probe_work_share": [d["summary"]["probe_work_share"] for d in defaults],
        "reproduced": reproduced,
    }
    import torch

    print(f"\n{summary['machine']}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{args.steps} steps, runs in this order:\n")  # fmt: skip
    print("| run | arm | wall time (s) | overhead against the disabled runs beside it | CPU time (s) | CPU overhead "
          "| CPU stolen by the host | probe time / training time (monitor) | probe work / training work (monitor) |\n"
          "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for i, r in enumerate(runs):
        s = r["summary"]
        cost = f"{100 * overheads[(i - 1) // 2]:.1f}%" if r["arm"] == "default" else "-"
        cpu_cost = f"{100 * cpu_overheads[(i - 1) // 2]:.1f}%" if r["arm"] == "default" else "-"
        print(f"| {i + 1} | {r['arm']} | {r['wall_s']:.1f} | {cost} | {r['cpu_s']:.1f} | {cpu_cost} | "
              f"{_pct(r['steal'])} | {_pct(s['probe_overhead'])} | {_pct(s['probe_work_share'])} |")  # fmt: skip
    print(f"\nmean overhead {100 * summary['overhead']:.2f}% of wall time, {100 * summary['cpu_overhead']:.2f}% of "
          f"CPU time; the disabled runs spread over "
          f"{100 * summary['off_spread']:.1f}% of their mean; default runs probed the same steps and raised the same "
          f"events: {'yes' if reproduced else 'NO'}\n")  # fmt: skip
    t = defaults[0]["summary"]["timings"] or {}
    total = t.get("total", 0.0)
    print("Where the probe time goes (first default run):\n\n| phase | seconds | share of probe time |\n|---|---|---|")
    for phase in PHASES:
        print(f"| {phase} | {t.get(phase, 0.0):.2f} | {100 * t.get(phase, 0.0) / max(total, 1e-9):.1f}% |")
    print(f"| total inside probes | {total:.2f} | 100% |\n")
    d = defaults[0]
    print(f"probed steps: {d['probed']}\nevents: {d['events']}")
    print({k: d["summary"][k] for k in ("onset_step", "at_risk_step", "first_alarm_step", "last_clean_step")})
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    return 0


def concurrent(pairs: int, steps: int, json_out: str | None) -> int:
    """``--concurrent``: ``pairs`` pairs, each pair's arms at once on their own cores, the cores swapped each pair."""
    runs: list[dict[str, Any]] = []
    overheads, cpu_overheads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(pairs):
            cores = {"off": k % 2, "default": 1 - k % 2}
            off, default = side_by_side(Path(tmp) / f"pair{k}", steps, cores)
            runs += [off, default]
            overheads.append((default["wall_s"] - off["wall_s"]) / off["wall_s"])
            cpu_overheads.append((default["cpu_s"] - off["cpu_s"]) / off["cpu_s"])
            print(f"pair {k + 1}/{pairs}: off {off['wall_s']:.1f} s on core {off['cpu']}, default "
                  f"{default['wall_s']:.1f} s on core {default['cpu']}: {100 * overheads[-1]:.2f}%",
                  flush=True)  # fmt: skip
    defaults = [r for r in runs if r["arm"] == "default"]
    reproduced = all(d["probed"] == defaults[0]["probed"] and d["events"] == defaults[0]["events"] for d in defaults)
    lo, hi = pair_interval(overheads)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "design": "concurrent: each pair's arms at once, one core and one torch thread each, cores swapped per pair",
        "steps": steps,
        "overhead": round(statistics.fmean(overheads), 4),
        "overhead_interval95": [round(lo, 4), round(hi, 4)],
        "overheads": [round(o, 4) for o in overheads],
        "cpu_overhead": round(statistics.fmean(cpu_overheads), 4),
        "cpu_overheads": [round(o, 4) for o in cpu_overheads],
        "probe_overhead": [d["summary"]["probe_overhead"] for d in defaults],
        "probe_work_share": [d["summary"]["probe_work_share"] for d in defaults],
        "reproduced": reproduced,
    }
    print("\n| pair | core (off / default) | off (s) | default (s) | overhead | CPU overhead "
          "| probe time / training time (monitor) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for k in range(pairs):
        off, d = runs[2 * k], runs[2 * k + 1]
        print(f"| {k + 1} | {off['cpu']} / {d['cpu']} | {off['wall_s']:.1f} | {d['wall_s']:.1f} | "
              f"{100 * overheads[k]:.2f}% | {100 * cpu_overheads[k]:.2f}% | "
              f"{_pct(d['summary']['probe_overhead'])} |")  # fmt: skip
    print(f"\nmean overhead {100 * summary['overhead']:.2f}% of wall time (95% interval {100 * lo:.2f}% to "
          f"{100 * hi:.2f}%), {100 * summary['cpu_overhead']:.2f}% of CPU time; default runs probed the same steps "
          f"and raised the same events: {'yes' if reproduced else 'NO'}")  # fmt: skip
    if json_out:
        Path(json_out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


if __name__ == "__main__":
    sys.exit(main())
