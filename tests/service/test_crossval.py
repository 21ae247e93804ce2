"""`merc cv`: folds never leak a held-out conversation into training; runs are reused; mean +- std."""

import json
from pathlib import Path

import pytest

from service.offline.crossval import fold_assignment, summarise, write_fold_data
from tests.service.test_cli import make_dataset, merc, tiny_sets


def test_folds_by_key_and_by_count() -> None:
    records = [{"id": f"c{i}", "media": {"session": 1 + i % 3}} for i in range(9)]
    assert fold_assignment(records, "media.session") == [i % 3 for i in range(9)]
    five = fold_assignment(records * 2, "5", seed=1)
    assert sorted(set(five)) == [0, 1, 2, 3, 4] and five == fold_assignment(records * 2, "5", seed=1)
    assert five != fold_assignment(records * 2, "5", seed=2)
    with pytest.raises(ValueError, match=r"no 'media\.speaker'"):
        fold_assignment(records, "media.speaker")
    with pytest.raises(ValueError, match="distinct"):
        fold_assignment([{"id": "a", "s": 1}, {"id": "b", "s": 1}], "s")


def test_fold_data_holds_out_its_fold(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "toy", n_convs=10)
    ids = [json.loads(line)["id"] for line in (data / "train.jsonl").read_text().splitlines()]
    assignment = fold_assignment([{"id": i} for i in ids], "3")
    folder = write_fold_data(data, tmp_path / "f1", assignment, 1)
    read = lambda f: [json.loads(line)["id"] for line in (folder / f).read_text().splitlines()]  # noqa: E731
    held, train = read("heldout.jsonl"), read("train.jsonl")
    assert held and not set(held) & set(train) and sorted(held + train) == sorted(ids)
    assert (folder / "dev.jsonl").read_text() == (data / "dev.jsonl").read_text()


def test_summary_is_mean_and_std_over_runs() -> None:
    runs = [{"heldout": {"weighted_f1": x}, "dev": {"weighted_f1": x + 1}} for x in (60.0, 62.0, 64.0)]
    s = summarise(runs)
    assert s["heldout_weighted_f1"] == {"mean": 62.0, "std": 2.0, "n": 3}
    assert s["dev_weighted_f1"]["mean"] == 63.0


def test_cv_command_trains_each_fold_and_reuses_runs(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "toy", n_convs=12)
    work = tmp_path / "cv"
    args = [
        "cv", "sdt", "--data", str(data), "--work", str(work), "--folds", "2", "--seeds", "0,1",
        "--epochs", "3", "--batch-size", "4", "--device", "cpu", "--quiet", *tiny_sets("sdt"),
    ]  # fmt: skip
    res = merc(*args)
    assert res.returncode == 0, res.stderr
    result = json.loads((work / "cv.json").read_text())
    assert {(r["fold"], r["seed"]) for r in result["runs"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert result["summary"]["heldout_weighted_f1"]["n"] == 4
    assert "mean +- std" in (work / "cv.md").read_text()
    again = merc(*args)
    assert again.returncode == 0 and again.stdout.count("reused") == 4
    assert json.loads((work / "cv.json").read_text())["runs"] == result["runs"]
    changed = merc(*args, "--lr", "1e-3")  # another recipe: trained again
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.count("reused") == 0
    assert json.loads((work / "cv.json").read_text())["recipe"]["train"]["lr"] == 1e-3
