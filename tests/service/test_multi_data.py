"""Training on several dataset folders: label mapping, per-dataset modalities, `merc train --data A --data B`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data import DataError
from service.offline.multi_data import load_training_data, parse_data_modalities, parse_label_map
from tests.service.test_cli import make_dataset, merc, tiny_sets


def relabelled(folder: Path, name: str, mapping: dict[str, str]) -> Path:
    """``folder`` with its dataset name and labels renamed (a second corpus with its own label names)."""
    info = json.loads((folder / "dataset.json").read_text())
    info["name"] = name
    info["labels"] = [mapping[x] for x in info["labels"]] + ["meh"]
    (folder / "dataset.json").write_text(json.dumps(info))
    for split in ("train", "dev"):
        path = folder / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            for i, u in enumerate(row["utterances"]):
                u["label"] = "meh" if i == 0 else mapping[u["label"]]
                u["text"] = "a fixed sentence"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_parse_options() -> None:
    assert parse_label_map("calm=neutral, happy=joy,boredom=") == {"calm": "neutral", "happy": "joy", "boredom": None}
    assert parse_label_map(None) == {}
    assert parse_data_modalities(["ravdess8=audio", "b=text,audio"]) == {"ravdess8": ["audio"], "b": ["text", "audio"]}
    for bad in ("calm", "=x", "a=b,a=c"):
        with pytest.raises(ValueError):
            parse_label_map(bad)
    for bad in (["x"], ["x="], ["x=smell"]):
        with pytest.raises(ValueError):
            parse_data_modalities(bad)


def test_union_maps_labels_and_keeps_modalities(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", n_convs=4)
    b = relabelled(make_dataset(tmp_path / "b", n_convs=3, seed=1), "toyb", {"neg": "bad", "pos": "good"})
    data = load_training_data([a, b], {"bad": "neg", "good": "pos", "meh": None}, {"toyb": ["audio"]})
    assert data.info["name"] == "toy2+toyb" and data.info["labels"] == ["neg", "pos"]
    assert data.info["modalities_inline"] == ["text", "audio", "visual"]
    assert len(data.train) == 7 and len(data.dev) == 8
    b_utts = [u for c in data.sources[1].train for u in c.utterances]
    assert all(u.text is None and set(u.features) == {"audio"} for u in b_utts)
    assert {u.label for u in b_utts} == {None, "neg", "pos"}  # "meh" dropped: unlabelled, still in its session
    assert data.dev_slices() == {"toy2": slice(0, 4), "toyb": slice(4, 8)}
    with pytest.raises(DataError, match="--label-map good=LABEL"):
        load_training_data([a, b], {"bad": "neg", "meh": None})
    with pytest.raises(DataError, match="no dataset named"):
        load_training_data([a, b], {}, {"nope": ["audio"]})


def test_spec_clash_is_an_error(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", n_convs=2)
    b = make_dataset(tmp_path / "b", n_convs=2, seed=1)
    info = json.loads((b / "dataset.json").read_text())
    info["name"], info["feature_spec"]["audio"]["extractor"] = "other", "another-audio"
    (b / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="audio features of other"):
        load_training_data([a, b])
    spec = load_training_data([a, b], data_modalities={"other": ["text"]}).info["feature_spec"]
    assert spec["audio"]["extractor"] == "toy-audio"  # only the first one's audio is used


def test_merc_train_on_two_datasets(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", n_convs=12)
    b = relabelled(make_dataset(tmp_path / "b", n_convs=12, seed=1), "toyb", {"neg": "bad", "pos": "good"})
    bundle = tmp_path / "bundle"
    args = ["--data", str(a), "--data", str(b), "--label-map", "bad=neg,good=pos,meh="]
    args += ["--data-modalities", "toyb=audio"]
    res = merc("train", "iteach", *args, "--out", str(bundle), "--epochs", "3", "--batch-size", "4", "--device", "cpu",
               "--quiet", *tiny_sets("iteach"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    dataset = manifest["dataset"]
    assert dataset["name"] == "toy2+toyb" and len(dataset["files"]) == 4
    assert dataset["label_map"] == {"bad": "neg", "good": "pos", "meh": None}
    assert [s["modalities"] for s in dataset["sources"]] == ["all", ["audio"]]
    assert set(manifest["dev_metrics_by_dataset"]) == {"toy2", "toyb"}
    b_dev = [json.loads(line)["utterances"] for line in (b / "dev.jsonl").read_text().splitlines()]
    assert manifest["dev_metrics_by_dataset"]["toyb"]["n"] == sum(len(u) - 1 for u in b_dev)  # "meh" left out
    res = merc("evaluate", "--bundle", str(bundle), "--data", str(b / "dev.jsonl"), "--out", str(tmp_path / "ev"),
               "--label-map", "bad=neg,good=pos,meh=", "--drop", "text", "--device", "cpu", "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["n"] == manifest["dev_metrics_by_dataset"]["toyb"]["n"]


def test_speaker_norm_reaches_the_manifest_with_a_fine_tuned_text_encoder(tmp_path: Path) -> None:
    """The spec of a fine-tuned text encoder is copied for the manifest: the audio normalise entry must follow."""
    extractor = Path(__file__).resolve().parents[2] / "weights" / "text" / "meld7-minilm-conv-distill"
    if not (extractor / "finetune.json").is_file():
        pytest.skip(f"{extractor} absent")
    data = make_dataset(tmp_path / "a", n_convs=4)
    for split in ("train", "dev"):
        path = data / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            for u in row["utterances"]:
                u["text"] = "Fine, thanks."
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = tmp_path / "bundle"
    res = merc("train", "iteach", "--data", str(data), "--modalities", "text,audio", "--text-encoder", str(extractor),
               "--speaker-norm", "audio", "--out", str(bundle), "--epochs", "1", "--device", "cpu", "--quiet",
               *tiny_sets("iteach"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    spec = json.loads((bundle / "manifest.json").read_text())["feature_spec"]
    assert spec["audio"]["normalise"]["file"] == "audio_speaker_norm.safetensors"
    assert (bundle / "audio_speaker_norm.safetensors").is_file() and spec["text"]["adapter"] == "text_encoder"
