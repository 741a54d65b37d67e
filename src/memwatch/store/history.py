"""The read model over a run's store: what happened, step by step, as curves, the report and rule replay see it.

Everything that shows a run (``memwatch curves``, ``memwatch report``) and everything that resumes
one (:meth:`memwatch.core.session.ProbeSession.replay`) reads it through :func:`load_history`, so they
agree on which value a step has when a step was measured twice (the later result wins), which rules
can be evaluated, and which memorization threshold the run used.

Example:
    >>> with Store(find_store("out/"), readonly=True) as store:  # doctest: +SKIP
    ...     history = load_history(store)
    >>> history.metrics["regurgitation/mem_fraction"]  # doctest: +SKIP
    {250: 0.0, 500: 0.0, 750: 0.03125}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.signals.image_risk import DEFAULT_RATIO
from memwatch.signals.rules import FORECAST, OPS
from memwatch.store import OUTPUT_SUBDIR, STORE_NAME, Store


@dataclass
class RunHistory:
    """One run as its store records it.

    Attributes:
        run: the run's name.
        run_id: its id in the store.
        info: the store's run row (``config``, ``config_hash``, ``reference``, ``holdout``, ``info``,
            ``created_at``).
        metrics: ``"probe/metric"`` -> {step: value}; NaN where the probe ran but the value is undefined.
            Snapshots whose weights are not the run's own kind (the EMA final model of a run probed
            with ``weights: raw``) form their own series, ``"probe/metric@ema"``, so a curve never
            mixes raw and EMA weights.
        rules: the rule dicts of the run's config that can be evaluated (a metric, a known operator and
            a finite threshold).
        events: event dicts (the store's ``events`` rows).
        seeds: the per-sample match rows (seed, step, nn1, ratio, d1, similarity, memorized, sample, prompt, group,
            own_image, result_id), by seed then step: each fixed seed's trajectory, whichever probe recorded it.
        mem_ratio: the d1/d2 threshold below which a sample counts as memorized (the image-risk default here;
            :func:`memwatch.core.declared.load_run` sets the one the run's probes declare).
        snapshots, results, metric_rows, matches: the store's rows of this run.
        training_set: the run's training-set analysis row (:meth:`Store.training_set`), or None.
        interventions: what changed the run's training (:meth:`Store.interventions`), in order.
    """

    run: str
    run_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[dict[str, Any]] = field(default_factory=list)
    mem_ratio: float = DEFAULT_RATIO
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    metric_rows: list[dict[str, Any]] = field(default_factory=list)
    matches: list[dict[str, Any]] = field(default_factory=list)
    training_set: dict[str, Any] | None = None
    interventions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def training_copies(self) -> dict[str, int] | None:
        """Training id -> copies of it in the training set, itself included (its largest duplicate group),
        for images in a group; None when the training set was not analysed. Byte-identical copies are one
        content, named by its first id (as ``nn1`` names it), so only that id is listed."""
        analysis = (self.training_set or {}).get("analysis")
        if not analysis:
            return None
        groups = analysis.get("duplicate_groups", [])
        aliases = {i for g in groups if g["kind"] == "exact" for i in g["ids"][1:]}
        out: dict[str, int] = {}
        for g in groups:
            for i in g["ids"]:
                if i not in aliases:
                    out[i] = max(out.get(i, 1), len(g["ids"]))
        return out

    @property
    def config(self) -> dict[str, Any]:
        config = self.info.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def steps(self) -> list[int]:
        """Every step at which any metric was recorded, ascending."""
        return sorted({s for values in self.metrics.values() for s in values})

    def observations(self) -> list[tuple[int, int, dict[str, float]]]:
        """``(step, snapshot id, {"probe/metric": value})`` per measured snapshot, in the order its
        results were first written: what the rules saw, probe by probe."""
        order: dict[int, int] = {}
        step: dict[int, int] = {}
        values: dict[int, dict[str, float]] = {}
        for m in self.metric_rows:
            sid = m["snapshot_id"]
            order[sid] = min(order.get(sid, m["result_id"]), m["result_id"])
            step[sid] = int(m["step"])
            values.setdefault(sid, {})[f"{m['probe']}/{m['metric']}"] = float(m["value"])
        return [(step[sid], sid, values[sid]) for sid in sorted(order, key=order.__getitem__)]

    def by_step(self) -> dict[int, dict[str, float]]:
        """step -> {"probe/metric": value}, steps ascending (what the rules saw at each probe)."""
        out: dict[int, dict[str, float]] = {}
        for name, series in self.metrics.items():
            for step, value in series.items():
                out.setdefault(step, {})[name] = value
        return {step: out[step] for step in sorted(out)}


def run_folder(store_path: str | Path) -> Path:
    """The training run's folder of a store: the folder holding ``memwatch/`` for ``<run>/memwatch/memwatch.sqlite``,
    else the store's own folder (absolute).

    Example:
        >>> run_folder("/runs/sd/memwatch/memwatch.sqlite").as_posix(), run_folder("/jobs/memwatch.sqlite").as_posix()
        ('/runs/sd', '/jobs')
    """
    folder = Path(store_path).absolute().parent
    return folder.parent if folder.name == OUTPUT_SUBDIR else folder


def find_store(run_dir: str | Path) -> Path:
    """The store file of a run folder.

    Args:
        run_dir: the folder holding ``memwatch.sqlite``, a training output dir with
            ``memwatch/memwatch.sqlite`` inside, or the store file itself.

    Raises:
        MemwatchError: no store in either place.

    Example:
        >>> find_store("no/such/run")
        Traceback (most recent call last):
        ...
        memwatch.errors.MemwatchError: run folder no/such/run does not exist: ...
    """
    root = Path(run_dir)
    if root.is_file():
        return root
    candidates = (root / STORE_NAME, root / OUTPUT_SUBDIR / STORE_NAME)
    for path in candidates:
        if path.is_file():
            return path
    if not root.is_dir():
        raise MemwatchError(f"run folder {root} does not exist: pass the training output dir or its memwatch/ folder")
    raise MemwatchError(
        f"no memwatch store in {root}: looked for {candidates[0]} and {candidates[1]}; "
        "pass the training output dir or the folder holding memwatch.sqlite"
    )


def load_history(store: Store, run: str | None = None) -> RunHistory:
    """Read one run from an open store.

    Args:
        store: an open :class:`memwatch.store.Store`.
        run: run name; None picks the most recently created run.

    Raises:
        MemwatchError: the store has no run, or none called ``run`` (the message lists the runs).
    """
    info = _pick_run(store, run)
    run_id = info["id"]
    config = info["config"] if isinstance(info["config"], dict) else {}
    metric_rows = store.metrics(run_id)
    matches = store.matches(run_id)
    snapshots = store.snapshots(run_id)
    own = config.get("weights") or "raw"
    series = {s["id"]: f"@{s['weights']}" for s in snapshots if s.get("weights") not in (None, own)}
    return RunHistory(
        run=info["name"],
        run_id=run_id,
        info=info,
        metrics=metric_table(metric_rows, series),
        rules=valid_rules(config.get("rules")),
        events=store.events(run_id),
        seeds=_seed_rows(matches),
        snapshots=snapshots,
        results=store.results(run_id),
        metric_rows=metric_rows,
        matches=matches,
        training_set=store.training_set(run_id),
        interventions=store.interventions(run_id),
    )


def metric_table(
    rows: Iterable[Mapping[str, Any]], series: Mapping[int, str] | None = None
) -> dict[str, dict[int, float]]:
    """``probe/metric`` -> {step: value}. Two results for one step (a live and a checkpoint
    snapshot, or two probe configs) give one value: the later-written result (higher id) wins.

    Args:
        rows: the store's metric rows.
        series: snapshot id -> suffix of the series its values belong to (e.g. ``"@ema"``).
    """
    series = series or {}
    table: dict[str, dict[int, float]] = {}
    written: dict[tuple[str, int], int] = {}
    for m in rows:
        key, step = f"{m['probe']}/{m['metric']}{series.get(m['snapshot_id'], '')}", int(m["step"])
        if written.get((key, step), -1) > m["result_id"]:
            continue
        written[(key, step)] = m["result_id"]
        table.setdefault(key, {})[step] = float(m["value"])
    return {k: dict(sorted(table[k].items())) for k in sorted(table)}


def valid_rules(raw: Any) -> list[dict[str, Any]]:
    """Rules with a metric and a finite numeric threshold (a known operator, or a forecast rule's
    ``horizon_share``); others cannot be evaluated.

    Example:
        >>> [r["name"] for r in valid_rules([{"name": "a", "metric": "p/m", "op": ">", "value": 1},
        ...                                 {"name": "b", "metric": "p/m", "op": "?", "value": 1}])]
        ['a']
    """
    out = []
    for r in raw if isinstance(raw, list) else []:
        if not isinstance(r, dict) or not isinstance(r.get("metric"), str):
            continue
        forecast = r.get("type") == FORECAST
        if not forecast and r.get("op") not in OPS:
            continue
        value = r.get("horizon_share" if forecast else "value")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out.append(r)
    return out


def training_images(seeds: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per training image ever memorized: first step, the seeds that memorized it then, total hits.

    Args:
        seeds: rows as in :attr:`RunHistory.seeds`.

    Returns:
        Dicts with ``training_id``, ``first_step``, ``first_seeds`` (sorted) and ``total_hits``, by
        first step then id.

    Example:
        >>> training_images([{"seed": 3, "step": 400, "nn1": "a.png", "memorized": 1}])
        [{'training_id': 'a.png', 'first_step': 400, 'first_seeds': [3], 'total_hits': 1}]
    """
    first: dict[str, int] = {}
    first_seeds: dict[str, set[int]] = {}
    hits: dict[str, int] = {}
    for r in seeds:
        if not r.get("memorized") or r.get("nn1") is None:
            continue
        tid, step = str(r["nn1"]), int(r["step"])
        hits[tid] = hits.get(tid, 0) + 1
        if tid not in first or step < first[tid]:
            first[tid], first_seeds[tid] = step, set()
        if step == first[tid] and r.get("seed") is not None:
            first_seeds[tid].add(int(r["seed"]))
    order = sorted(first, key=lambda t: (first[t], t))
    return [
        {"training_id": t, "first_step": first[t], "first_seeds": sorted(first_seeds[t]), "total_hits": hits[t]}
        for t in order
    ]


def _pick_run(store: Store, name: str | None) -> dict[str, Any]:
    runs = store.runs()
    if not runs:
        raise MemwatchError(f"store {store.path} has no runs yet: probe a model first (monitor, watch or probe)")
    if name is None:
        # Most recently created; ties (same clock reading) go to the later insert.
        return max(runs, key=lambda r: (r["created_at"], r["id"]))
    for r in runs:
        if r["name"] == name:
            return r
    listed = ", ".join(repr(r["name"]) for r in runs)
    raise MemwatchError(f"store {store.path} has no run {name!r}: its runs are {listed}; pass one with --run")


def _seed_rows(matches: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = [
        {
            "seed": m.get("seed"),
            "step": int(m["step"]),
            "nn1": m.get("nn1"),
            "ratio": m.get("ratio"),
            "d1": m.get("d1"),
            "similarity": m.get("similarity"),
            "memorized": None if m.get("memorized") is None else int(bool(m["memorized"])),
            "sample": m.get("sample"),
            "prompt": m.get("prompt"),  # text-to-image samples: the caption and its group (member / holdout)
            "group": m.get("group"),
            "own_image": m.get("own_image"),
            "result_id": m["result_id"],
        }
        for m in matches
    ]
    # Samples without a seed (e.g. scored from a folder) sort after seeded ones, by name.
    rows.sort(key=lambda r: (r["seed"] is None, r["seed"] or 0, r["sample"] or "", r["step"], r["result_id"]))
    return rows
