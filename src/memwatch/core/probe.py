"""What a probe is: a small object with declared settings and metrics, and one job, snapshot in, result out.

A probe subclasses :class:`Probe` and declares, as class attributes:

* ``name``: the key of its results (``"<name>/<metric>"``) and of its settings (``probes.<name>``);
* ``Settings``: a :class:`ProbeSettings` dataclass of its settings (each declared once, with
  :func:`memwatch.settings.setting`); ``every`` is the cadence in training steps, 0 turns it off, and
  for a sample probe null means "whenever the shared samples are drawn" (``sampling.every``);
* what it needs: ``needs_holdout`` (non-member images), ``needs_samples`` (the shared fixed-seed
  generated samples), ``uses_embedder`` (it compares in the embedder's space), ``text_to_image_only``;
* ``metrics``: the metrics it reports, each a name or a :class:`Metric` that says what the metric means
  to the views (its role in the memorization chart, its threshold, whether it marks the onset); rules
  are checked against them;
* ``default_rules``: warning rules that ship with it (dicts in the YAML shape of :mod:`memwatch.signals.rules`);
* ``unmeasured``: what the report says when the probe has no result on a run (None: nothing), and
  :meth:`Probe.limitations` for what its own results cannot show;
* ``order``: where it is listed among the probes (config, default rules) and run; lower first.

and implements two steps, the torchmetrics way:

* :meth:`Probe.compute` runs on *every* process and returns this process's rows (its share of the
  work, from :attr:`ProbeContext.workers`); the host gathers the rows of all processes in order;
* :meth:`Probe.reduce` runs on the main process over all rows and returns the :class:`ProbeResult`.

Sample probes (``needs_samples``) have no per-process part: the host draws the samples once, shared
by all sample probes due at that step, and hands them to :meth:`Probe.reduce` in
:attr:`ProbeContext.samples`, where :meth:`~memwatch.sampling.plan.Samples.neighbours` finds their
nearest training images once for all of them. The host (:class:`memwatch.core.session.ProbeSession`)
owns everything else: when a probe is due, whether it applies to the model, gathering, failures, the
store, rules.

A built-in probe is one file in :mod:`memwatch.probes` (found there by :mod:`memwatch.core.registry`);
your own is a module anywhere, named in the config's ``custom_probes``, or an instance handed to the monitor.

Example: a sampling-free probe in a few lines (the test suite plugs one like it into the monitor
and into ``memwatch probe`` without touching memwatch)::

    @dataclass
    class WeightNormSettings(ProbeSettings):
        section = "probes.weight_norm"
        every: int = setting(10, "probe every this many steps (0: off)", min=0, unit="steps")

    class WeightNormProbe(Probe):
        name = "weight_norm"
        Settings = WeightNormSettings
        metrics = (Metric("norm", label="weight norm"),)

        def reduce(self, rows, ctx):
            norm = sum(float(p.norm()) ** 2 for p in ctx.parts.unet.parameters()) ** 0.5
            return ProbeResult(self.name, {"norm": norm})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from memwatch.errors import MemwatchError
from memwatch.settings import Settings, setting

if TYPE_CHECKING:  # heavy imports only for type checkers: `import memwatch.core.probe` stays light
    from memwatch.core.evidence import EvidencePair
    from memwatch.core.workers import Workers
    from memwatch.data.reference_index import ReferenceIndex
    from memwatch.data.refset import ReferenceSet
    from memwatch.models.parts import ModelParts
    from memwatch.sampling.plan import Samples, SamplingSettings

#: What a metric is to the views (:class:`Metric`'s ``role``):
#: ``share``: a share of samples (0 to 1) that show memorization, drawn on its panel's left axis;
#: ``precursor``: a value that approaches its ``threshold`` before memorization shows, drawn dashed with it;
#: ``forecast``: a forecast step with its band (``<name>_low``, ``<name>_high``), drawn on the step axis;
#: ``separability``: how well members are told from non-members (chance at its ``threshold``), right axis;
#: ``count``: a count drawn on its panel's right axis; ``detail``: only in the detail grid (``curves.png``).
ROLES = ("share", "precursor", "forecast", "separability", "count", "detail")
#: The panel of the memorization chart that holds a run's copying (the run's onset is marked there).
MAIN_PANEL = "memorization"


@dataclass(frozen=True)
class Metric:
    """What one metric of a probe means to the views: the memorization chart, the report and the summary.

    Attributes:
        name: the metric's name (``"<probe>/<name>"`` in the store).
        role: one of :data:`ROLES`.
        label: how charts and the report name it (default: the name).
        panel: the panel of the memorization chart it is drawn on (:data:`MAIN_PANEL`, ``"faces"``, or a
            panel of its own).
        threshold: the value that matters: a number, the name of one of the probe's settings, or the name
            of another metric of the probe (its value at that step).
        onset: if set, its first value above 0 marks the onset of memorization on its panel, named so
            (``"first copy"``); on :data:`MAIN_PANEL` it is the run's onset.
        out_of: a ``share``'s denominator: the metric that counts what it is a share of (for its interval).

    Example:
        >>> Metric("mem_fraction", role="share", out_of="num_samples").role
        'share'
    """

    name: str
    role: str = "detail"
    label: str = ""
    panel: str = MAIN_PANEL
    threshold: float | str | None = None
    onset: str = ""
    out_of: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise MemwatchError(f"metric {self.name!r}: role {self.role!r} is unknown; use one of {', '.join(ROLES)}")

    @property
    def title(self) -> str:
        return self.label or self.name

    def threshold_value(self, settings: Mapping[str, Any], values: Mapping[str, float]) -> float | None:
        """The threshold as a number: itself, the probe's setting of that name, or the metric of that name in
        ``values`` (this probe's metrics at one step); None when there is none."""
        t = self.threshold
        if t is None or isinstance(t, bool):
            return None
        if isinstance(t, int | float):
            return float(t)
        for source in (settings, values):
            v = source.get(t)
            if isinstance(v, int | float) and not isinstance(v, bool):
                return float(v)
        return None


@dataclass
class ProbeRecord:
    """What a run's store holds of one probe: what :meth:`Probe.limitations` judges (rows as the store's views
    return them, this probe's only).

    Attributes:
        settings: the probe's settings in the run's config (empty if it was not configured).
        results: result rows, ok and failed.
        metrics: metric rows.
        matches: per-sample match rows.
        items: per-item rows.
        reference, holdout: the run's set summaries (``n``, ``skipped``, ``manifest_sha256``...).
    """

    settings: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    matches: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    holdout: dict[str, Any] | None = None

    @property
    def measured(self) -> bool:
        """Whether any result succeeded."""
        return any(r.get("status") == "ok" for r in self.results)


@dataclass
class ProbeResult:
    """Output of one probe on one snapshot.

    Attributes:
        probe: probe name, e.g. ``"regurgitation"`` or ``"membership"``.
        metrics: metric name -> value (floats; NaN where undefined).
        matches: per-sample rows (regurgitation): ``sample``, ``seed``, ``nn1``, ``d1``, ``d2``,
            ``ratio``, ``similarity``, ``extraction``, ``memorized``, ``copied``, ``extracted``.
        items: other per-item rows a probe wants kept (e.g. per-example losses).
        timings: seconds spent per phase (``sampling``, ``embedding``, ``search``...).
        evidence: paths of evidence files written for this result.
    """

    probe: str
    metrics: dict[str, float]
    matches: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)


@dataclass
class ProbeSettings(Settings):
    """Settings every probe has; a probe's own ``Settings`` subclass adds its own (and may change ``every``)."""

    every: int | None = setting(
        0,
        "run the probe every this many training steps (0: off; sample probes: null follows sampling.every)",
        min=0,
        unit="steps",
    )


@dataclass
class ProbeContext:
    """Everything a probe may use at one probed step.

    Attributes:
        step: training step of the snapshot.
        parts: the model (:class:`~memwatch.models.parts.ModelParts`).
        data: the run's reference and holdout sets and what is built from them once.
        workers: this process's share of the work and the gather across processes.
        samples: the shared generated samples (sample probes, main process), else None.
        timings: phase -> seconds of the host, which probes add to with :meth:`add_time`.
        past: the host's reader of earlier results (see :meth:`earlier`), None without a store.
    """

    step: int
    parts: ModelParts
    data: ProbeData
    workers: Workers
    samples: Samples | None = None
    timings: dict[str, float] = field(default_factory=dict)
    past: Callable[[str, int], list[dict[str, Any]]] | None = None

    def earlier(self, probe: str, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` results of ``probe`` on this run's earlier snapshots (same weights kind),
        oldest first, each ``{"step", "metrics", "items"}`` (main process; empty without a store).

        Probes that follow a trajectory read their own past here: the onset forecast, the
        holdout-loss turning point.
        """
        return self.past(probe, limit) if self.past is not None else []

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def reference_index(self) -> ReferenceIndex:
        """The training set embedded at the model's resolution, built on first use (time: ``reference_embedding``)."""
        fresh = not self.data.has_index
        index = self.data.reference_index(self.parts.image_resolution)
        if fresh:
            self.add_time("reference_embedding", index.seconds)
        return index


class ProbeData:
    """A run's training and holdout sets, and the resources built from them once and shared by probes.

    Args:
        refs: the training (reference) set.
        holdout: non-member images, or None.
        embedder: builds the embedder for a resolution (``(resolution) -> Embedder``).
        cache_dir: the embedding cache folder (None: the default).
        search: how samples are matched to training images (:func:`memwatch.search.index.build_search`).
    """

    def __init__(
        self,
        refs: ReferenceSet,
        holdout: ReferenceSet | None,
        embedder: Callable[[int], Any],
        cache_dir: str | None = None,
        *,
        search: str = "auto",
    ):
        self.refs = refs
        self.search = search
        self.holdout = holdout
        self.cache_dir = cache_dir
        self._embedder = embedder
        self._index: ReferenceIndex | None = None

    @property
    def has_index(self) -> bool:
        return self._index is not None

    def reference_index(self, resolution: int) -> ReferenceIndex:
        """The training set embedded (through the cache) and ready for search; built on first use.

        Args:
            resolution: the model's image resolution (the pixel embedder's default resolution).
        """
        if self._index is None:
            from memwatch.data.embed_cache import EmbeddingCache
            from memwatch.data.reference_index import ReferenceIndex

            self._index = ReferenceIndex(
                self.refs, self._embedder(resolution), EmbeddingCache(self.cache_dir), search=self.search
            )
        return self._index


class Probe:
    """Base class of probes (see the module docstring for what a subclass declares).

    Args:
        settings: an instance of the probe's ``Settings``; or give its values as keyword arguments.

    Example:
        >>> from memwatch.probes.membership import MembershipProbe
        >>> MembershipProbe(every=100).settings.every
        100
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[ProbeSettings]] = ProbeSettings
    order: ClassVar[int] = 100
    needs_holdout: ClassVar[bool] = False
    needs_samples: ClassVar[bool] = False
    uses_embedder: ClassVar[bool] = False
    text_to_image_only: ClassVar[bool] = False
    metrics: ClassVar[tuple[str | Metric, ...]] = ()
    #: names of companion results the probe may return after its own (their metrics are not declared)
    companions: ClassVar[tuple[str, ...]] = ()
    default_rules: ClassVar[tuple[dict[str, Any], ...]] = ()
    #: what the report says when the probe measured nothing on a run (None: nothing to say)
    unmeasured: ClassVar[str | None] = None
    #: the setting holding the d1/d2 below which the probe's per-sample match rows count as copies (the rows'
    #: ``memorized``); the views draw each seed's and each training image's approach against it
    matches_threshold: ClassVar[str | None] = None

    def __init__(self, settings: ProbeSettings | None = None, **values: Any):
        if not self.name:
            raise MemwatchError(f"{type(self).__name__}: a probe class must set a name")
        if settings is not None and values:
            raise MemwatchError(f"{type(self).__name__}: pass settings or keyword values, not both")
        self.settings = settings if settings is not None else self.Settings(**values)
        if not isinstance(self.settings, self.Settings):
            got = type(self.settings).__name__
            raise MemwatchError(f"{type(self).__name__}: settings must be a {self.Settings.__name__}, not {got}")
        if self.settings.every is None and not self.needs_samples:
            raise MemwatchError(
                f"setting 'probes.{self.name}.every' is null, which only sample probes may be (they then follow "
                "sampling.every): give a number of steps, or 0 to turn it off"
            )
        #: ``sampling.every``, which a sample probe with ``every: null`` follows (set by the host)
        self.sampling_every = 0

    @property
    def every(self) -> int:
        """The cadence in training steps: the probe's own ``every``, or ``sampling.every`` when that is null."""
        own = self.settings.every
        return self.sampling_every if own is None else own

    @classmethod
    def declared(cls) -> dict[str, Metric]:
        """The declared metrics by name, a plain name declared as a ``detail`` metric.

        Example:
            >>> from memwatch.probes.regurgitation import RegurgitationProbe
            >>> RegurgitationProbe.declared()["mem_fraction"].role
            'share'
        """
        return {m.name: m for m in (x if isinstance(x, Metric) else Metric(x) for x in cls.metrics)}

    def result_key(self, sampling: SamplingSettings, embedder: Mapping[str, Any]) -> dict[str, Any]:
        """What the probe's results depend on, hashed into the key they are stored under: its settings (not its
        cadence), the samples' settings when it reads samples, the embedder's when it compares in its space.
        A change in any of them measures again; anything else (a rule, another probe's settings, the cadence)
        does not."""
        own = {k: v for k, v in self.settings.keyed().items() if k != "every"}
        key: dict[str, Any] = {"probe": self.name, "settings": own}
        if self.needs_samples:
            key["sampling"] = sampling.key()
        if self.uses_embedder:
            key["embedder"] = dict(embedder)
        return key

    def applies(self, *, text_to_image: bool, has_holdout: bool) -> bool:
        """Whether the probe runs on a model of this kind with this data (cadence on, needs met).

        Args:
            text_to_image: whether the model is text-conditioned.
            has_holdout: whether the run has a holdout set.
        """
        return (
            self.every > 0
            and (has_holdout or not self.needs_holdout)
            and (text_to_image or not self.text_to_image_only)
        )

    def compute(self, ctx: ProbeContext) -> list[dict[str, Any]]:
        """This process's rows (called on every process; the host gathers them in process order)."""
        return []

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult | Sequence[ProbeResult]:
        """The result from every process's rows (main process). A probe may return companion results
        (recorded under their own names with this probe's settings) after its own."""
        raise NotImplementedError(f"{type(self).__name__}.reduce")

    def evidence(self, result: ProbeResult) -> dict[str, Any]:
        """Details for the events this result raises (seeds, training ids, prompts...)."""
        return {}

    @classmethod
    def evidence_pairs(cls, result: ProbeResult) -> list[EvidencePair]:
        """Sample probes: the (sample, training image) pairs shown in the evidence grid, ranked (the report
        rebuilds them from the stored rows to cut each sample out of the grid)."""
        return []

    @classmethod
    def limitations(cls, record: ProbeRecord) -> list[tuple[str, str]]:
        """``(code, message)`` for what this probe's stored results cannot show on a run (the report lists
        them); by default the :attr:`unmeasured` note when nothing was measured."""
        if cls.unmeasured and not record.measured:
            return [(f"no-{cls.name}", cls.unmeasured)]
        return []
