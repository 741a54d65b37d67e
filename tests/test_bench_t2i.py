"""The text-to-image benchmark's own parts (scripts/bench_t2i.py): reading the example scripts from a diffusers
clone, the captioned sets it fine-tunes on, and the per-caption truth. The runs themselves train for minutes
and are the benchmark's business (docs/benchmarks.md), not the suite's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
pytest.importorskip("skimage", reason="scripts/t2i_data.py crops scikit-image's photos (memwatch[test])")

import bench_t2i  # noqa: E402


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)  # fmt: skip


def test_scripts_are_read_at_the_pinned_tag_and_a_missing_clone_is_one_line(tmp_path, capsys) -> None:
    repo = tmp_path / "diffusers"
    for rel in bench_t2i.SCRIPTS.values():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(f"# {rel} at the tag\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "release")
    _git(repo, "tag", bench_t2i.TAG)
    for rel in bench_t2i.SCRIPTS.values():  # later commits do not leak in: the tag is what runs
        (repo / rel).write_text("# newer\n")
    _git(repo, "commit", "-qam", "later")

    found = bench_t2i.example_scripts(repo, tmp_path / "out")
    assert sorted(found) == sorted(bench_t2i.SCRIPTS)
    assert all(p.read_text().endswith("at the tag\n") for p in found.values())

    with pytest.raises(SystemExit) as exc:
        bench_t2i.example_scripts(tmp_path / "nowhere", tmp_path / "out2")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "nowhere") in err and bench_t2i.TAG in err


def test_the_sets_are_imagefolders_memwatch_reads_with_unique_captions(tmp_path) -> None:
    from memwatch.data.refset import load_reference_set
    from memwatch.sampling.text_to_image import prompt_sets

    spec = bench_t2i.T2IRunSpec("lora", 6, 3, 10, 5, str(tmp_path), "unused")
    train, holdout = bench_t2i.write_sets(spec, tmp_path / spec.name)
    refs, held = load_reference_set(str(train)), load_reference_set(str(holdout))
    assert len(refs) == 6 and len(held) == bench_t2i.HOLDOUT_CAPTIONS
    members, _ = prompt_sets(refs, held, 100, 100, "test")
    assert len(set(members.prompts)) == 6  # every training image has its own caption
    again, _ = bench_t2i.write_sets(spec, tmp_path / "again")  # the same seed gives the same set
    assert (train / "metadata.jsonl").read_text() == (again / "metadata.jsonl").read_text()


def test_per_caption_truth_names_the_first_copy_and_whose_image_it_is() -> None:
    third = 1 / 3
    truth = {
        "seeds_per_caption": 2,
        "image_ids": ["a.png", "b.png"],
        "captions": ["cap a", "cap b"],
        "steps": [0, 50, 100],
        # samples: caption a seeds 0-1, caption b seeds 0-1 (then held-out captions, ignored here)
        "ratios": [[0.9, 0.8, 0.9, 0.9], [0.9, third - 0.01, 0.2, 0.9], [0.2, 0.2, 0.9, 0.1]],
        "nn1": [["a.png"] * 4, ["b.png", "a.png", "a.png", "a.png"], ["a.png", "a.png", "a.png", "a.png"]],
        # at step 50, caption b's first sample is near in ratio but not in pixels: not yet a copy
        "d1": [[0.3] * 4, [0.3, 0.05, 0.3, 0.3], [0.05, 0.05, 0.3, 0.05]],
    }
    rows = bench_t2i.per_caption(truth)
    assert rows[0] == {"caption": "cap a", "image": "a.png", "first_copy_step": 50, "copies": "a.png",
                       "own_image": True}  # fmt: skip
    assert rows[1]["first_copy_step"] == 100 and rows[1]["copies"] == "a.png" and rows[1]["own_image"] is False
    # a ratio under 1/3 that is still far in pixels is no copy
    assert not bench_t2i.is_copy({"ratio": 0.2, "d1": bench_t2i.COPY_D1 + 0.01})


def test_the_cost_pairs_each_watched_run_with_its_twin_alone(tmp_path) -> None:
    import json

    spec = bench_t2i.T2IRunSpec("full", 4, 0, 10, 5, str(tmp_path), "unused")
    twin = bench_t2i.replace(spec, watch=False, truth=False)
    assert twin.name == spec.name + "-alone"
    (tmp_path / twin.name).mkdir()
    (tmp_path / twin.name / "alone.json").write_text(json.dumps({"train_s": 100.0, "train_cpu_s": 90.0}))
    rows = [
        {"script": "full", "n": 4, "seed": 0, "train_s": 104.0, "train_cpu_s": 91.0, "watch_cpu_s": 45.5},
        {"script": "full", "n": 8, "seed": 0, "train_s": 50.0, "train_cpu_s": 50.0, "watch_cpu_s": 50.0},  # no twin
    ]
    cost = bench_t2i.cost_summary(rows, tmp_path)
    assert cost["median_watch_cpu_share"] == 0.75  # (0.5 + 1.0) / 2
    assert [(p["n"], p["slowdown"]) for p in cost["side_by_side"]] == [(4, 0.04)]
    assert cost["median_slowdown"] == 0.04


def test_captions_the_base_model_already_copies_do_not_make_an_onset() -> None:
    third = 1 / 3
    truth = {
        "seeds_per_caption": 2, "captions": ["flat grey", "cat"], "steps": [0, 50, 100],
        # the flat grey crop passes at step 0 and after; the cat copies from step 100
        "ratios": [[0.2, 0.9, 0.9, 0.9], [0.2, 0.2, 0.9, 0.9], [0.2, 0.2, 0.2, third - 0.01]],
        "d1": [[0.05, 0.3, 0.3, 0.3], [0.05, 0.05, 0.3, 0.3], [0.05, 0.05, 0.05, 0.05]],
    }  # fmt: skip
    out = bench_t2i.onsets(truth)
    assert out["base_copied_captions"] == ["flat grey"]
    assert out["onset_step"] == 100 and out["first_copy_step"] == 100 and out["onset_ratio_only_step"] == 100


def test_varied_captions_train_on_lists_and_the_truth_prompts_with_the_original(tmp_path) -> None:
    from memwatch.data.refset import load_reference_set

    plain = bench_t2i.T2IRunSpec("full", 4, 1, 10, 5, str(tmp_path), "unused")
    varied = bench_t2i.replace(plain, vary_captions=5)
    assert varied.name != plain.name
    train, _ = bench_t2i.write_sets(plain, tmp_path / plain.name)
    vtrain, _ = bench_t2i.write_sets(varied, tmp_path / varied.name)
    rows = [json.loads(line) for line in open(vtrain / "metadata.jsonl")]
    assert all(isinstance(r["text"], list) and len(r["text"]) == 5 for r in rows)
    assert bench_t2i.metadata_rows(vtrain) == bench_t2i.metadata_rows(train)  # the same images, captions first
    assert [it.caption for it in load_reference_set(str(vtrain)).items] == [
        c for _, c in bench_t2i.metadata_rows(train)
    ]
    assert len(list((tmp_path / plain.name / "data" / "unseen").glob("*.png"))) == bench_t2i.QUALITY_IMAGES


def test_the_variation_summary_pairs_each_varied_run_with_its_plain_twin() -> None:
    base = {"script": "full", "n": 4, "seed": 0, "holdout_loss": 0.1, "kid": 0.01}
    rows = [
        {**base, "vary_captions": 0, "onset_step": 200},
        {**base, "vary_captions": 8, "onset_step": 500, "holdout_loss": 0.102, "kid": 0.012},
        {**base, "seed": 1, "vary_captions": 0, "onset_step": 100},
        {**base, "seed": 1, "vary_captions": 8, "onset_step": None},
    ]
    s = bench_t2i.variation_summary(rows)
    assert [p["delay"] for p in s["pairs"]] == [2.5, None]
    assert s["avoided"] == 1 and s["with_onset_without"] == 2
    assert abs(s["median_holdout_loss_cost"] - 0.01) < 1e-9
