"""What a probe is: a small object with declared settings and one job, snapshot in, result out.

A probe subclasses :class:`Probe` and declares, as class attributes:

* ``name``: the key of its results (``"<name>/<metric>"``) and of its settings (``probes.<name>``);
* ``Settings``: a :class:`ProbeSettings` dataclass of its settings (each declared once, with
  :func:`memwatch.settings.setting`); ``every`` is the cadence in training steps, 0 turns it off;
* what it needs: ``needs_holdout`` (non-member images), ``needs_samples`` (the shared fixed-seed
  generated samples), ``text_to_image_only`` (a text-conditioned model);
* ``metrics``: the metric names it reports (rules are checked against them; a probe that declares
  none accepts any);
* ``onset_metric``: optionally, the metric whose first value above 0 marks the onset of memorization
  (the first copy), for the run summary;
* ``default_rules``: warning rules that ship with it (dicts in the YAML shape of :mod:`memwatch.rules`).

and implements two steps, the torchmetrics way:

* :meth:`Probe.compute` runs on *every* process and returns this process's rows (its share of the
  work, from :attr:`ProbeContext.workers`); the host gathers the rows of all processes in order;
* :meth:`Probe.reduce` runs on the main process over all rows and returns the :class:`ProbeResult`.

Sample probes (``needs_samples``) have no per-process part: the host draws the samples once, shared
by all sample probes due at that step, and hands them to :meth:`Probe.reduce` in
:attr:`ProbeContext.samples`. The host (:class:`memwatch.session.ProbeSession`) owns everything
else: when a probe is due, whether it applies to the model, gathering, failures, the store, rules.

Example: a sampling-free probe in a few lines (the test suite plugs one like it into the monitor
and into ``memwatch probe`` without touching memwatch)::

    @dataclass
    class WeightNormSettings(ProbeSettings):
        section = "probes.weight_norm"
        every: int = setting(10, "probe every this many steps (0: off)", min=0, unit="steps")

    class WeightNormProbe(Probe):
        name = "weight_norm"
        Settings = WeightNormSettings
        metrics = ("norm",)

        def reduce(self, rows, ctx):
            norm = sum(float(p.norm()) ** 2 for p in ctx.parts.unet.parameters()) ** 0.5
            return ProbeResult(self.name, {"norm": norm})
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from memwatch.errors import MemwatchError
from memwatch.plugins import load_class
from memwatch.settings import Settings, setting

if TYPE_CHECKING:  # heavy imports only for type checkers: `import memwatch.probes.base` stays light
    import torch

    from memwatch.evidence import EvidencePair
    from memwatch.model_parts import ModelParts
    from memwatch.neighbours import ReferenceIndex
    from memwatch.refset import ReferenceSet
    from memwatch.samples import SamplePlan
    from memwatch.workers import Workers


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

    every: int = setting(0, "run the probe every this many training steps (0: off)", min=0, unit="steps")


@dataclass
class Samples:
    """The fixed-seed samples drawn for the sample probes due at one step (main process).

    Attributes:
        images: ``(N, 3, H, W)`` in [0, 1].
        plan: which seed (and prompt) each sample came from.
    """

    images: torch.Tensor
    plan: SamplePlan


@dataclass
class ProbeContext:
    """Everything a probe may use at one probed step.

    Attributes:
        step: training step of the snapshot.
        parts: the model (:class:`~memwatch.model_parts.ModelParts`).
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
        search: how samples are matched to training images (:func:`memwatch.vector_index.build_search`).
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
            from memwatch.embed_cache import EmbeddingCache
            from memwatch.neighbours import ReferenceIndex

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
    needs_holdout: ClassVar[bool] = False
    needs_samples: ClassVar[bool] = False
    text_to_image_only: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ()
    #: names of companion results the probe may return after its own (their metrics are not declared)
    companions: ClassVar[tuple[str, ...]] = ()
    onset_metric: ClassVar[str | None] = None
    default_rules: ClassVar[tuple[dict[str, Any], ...]] = ()

    def __init__(self, settings: ProbeSettings | None = None, **values: Any):
        if not self.name:
            raise MemwatchError(f"{type(self).__name__}: a probe class must set a name")
        if settings is not None and values:
            raise MemwatchError(f"{type(self).__name__}: pass settings or keyword values, not both")
        self.settings = settings if settings is not None else self.Settings(**values)
        if not isinstance(self.settings, self.Settings):
            got = type(self.settings).__name__
            raise MemwatchError(f"{type(self).__name__}: settings must be a {self.Settings.__name__}, not {got}")

    @property
    def every(self) -> int:
        return self.settings.every

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

    def evidence_pairs(self, result: ProbeResult) -> list[EvidencePair]:
        """Sample probes: the (sample, training image) pairs shown in the evidence grid."""
        return []


#: Built-in probes, in the order their default rules are listed. Probes are run sampling-free first
#: (cheap), then the sample probes on one shared set of samples.
BUILTIN_PROBES = {
    "regurgitation": "memwatch.probes.regurgitation:RegurgitationProbe",
    "forecast": "memwatch.probes.forecast:ForecastProbe",
    "identity": "memwatch.probes.identity:IdentityProbe",
    "membership": "memwatch.probes.membership:MembershipProbe",
    "condnoise": "memwatch.probes.condnoise:CondNoiseProbe",
}


def probe_class(spec: str) -> type[Probe]:
    """A probe class from a built-in name or an import path ``module:Class``.

    Example:
        >>> probe_class("membership").name
        'membership'
    """
    return load_class(spec, BUILTIN_PROBES, Probe, "probe")
