"""The intervention benchmark's own arithmetic (scripts/bench_interventions.py): the comparison of each arm with
its baseline on the same run, and the kernel distance it measures quality by. The runs themselves are the
benchmark's business (docs/benchmarks.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_interventions as bi  # noqa: E402
import bench_warnings as bw  # noqa: E402


def _row(arm: str, seed: int, onset: int | None, loss: float, kid: float) -> dict:
    return {"arm": arm, "n": 8, "seed": seed, "onset_step": onset, "holdout_loss": loss, "kid": kid}


def test_each_arm_is_compared_with_its_own_baseline() -> None:
    rows = [
        _row("none", 0, 800, 0.10, 0.010), _row("drop", 0, 1700, 0.102, 0.012),  # delayed 2.1x
        _row("none", 1, 600, 0.20, 0.020), _row("drop", 1, None, 0.22, 0.010),  # avoided, 10% loss cost
        _row("none", 2, None, 0.10, 0.010), _row("drop", 2, None, 0.10, 0.010),  # nothing to delay
        _row("none", 3, 500, 0.10, 0.010), _row("drop", 3, 600, 0.10, 0.010),  # 1.2x: not enough
    ]  # fmt: skip
    drop = bi.compare(rows)["drop"]
    assert drop["runs"] == 4 and drop["avoided"] == 1 and drop["delayed_2x_or_avoided"] == 2
    assert drop["median_delay"] == round((1700 / 800 + 600 / 500) / 2, 3)
    assert drop["median_holdout_loss_cost"] == 0.01  # the median of 2%, 10%, 0% and 0%
    assert drop["median_kid_change"] == 0.0


def test_the_kernel_distance_separates_distributions_and_not_samples_of_one() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(300, 48, generator=g), torch.rand(300, 48, generator=g)
    same = bw.kernel_distance(a[:150], b)
    shifted = bw.kernel_distance(a[:150] * 0.5, b)
    assert abs(same) < 0.02 < shifted


def test_every_arm_gets_its_own_folder_and_the_whole_budget(tmp_path: Path) -> None:
    todo = bi.specs([8], [0, 1], list(bi.ARMS), 3000, tmp_path)
    assert len(todo) == 2 * len(bi.ARMS)
    assert {(Path(s.out).name, s.intervention) for s in todo} == {(a, a) for a in bi.ARMS}
    assert all(s.full_budget and s.steps == 3000 for s in todo)
