import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.batching import collate, iterate_batches
from models.common import IGNORE_INDEX
from models.data import DataError, encode_conversation, inline_features, read_jsonl, speaker_ids

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(cid: str, n: int, with_audio: bool = True) -> dict:
    utts = []
    for i in range(n):
        u = {"id": f"{cid}_u{i}", "speaker": "AB"[i % 2], "text": f"hello {i}", "label": "pos" if i % 2 else "neg"}
        if with_audio and i != 1:
            u["features"] = {"audio": [float(i)] * 3}
        utts.append(u)
    return {"id": cid, "utterances": utts}


def test_read_and_encode(tmp_path: Path) -> None:
    convs = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [conv("c0", 3), conv("c1", 2)]))
    assert [c.id for c in convs] == ["c0", "c1"]
    enc = encode_conversation(convs[0], {"audio": inline_features(convs[0], "audio")}, {"audio": 3}, ["neg", "pos"], 9)
    assert enc.present[:, 1].tolist() == [True, False, True]
    assert enc.labels.tolist() == [0, 1, 0]
    assert enc.features["audio"][2].tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"id": "x", "utterances": []}), "utterances"),
        (json.dumps({"id": "x", "utterances": [{"text": "hi"}]}), "speaker"),
        (json.dumps({"id": "x", "utterances": [{"speaker": "a", "start": 2, "end": 1}]}), "end"),
        (json.dumps({"id": "x", "utterances": [{"speaker": "a", "start": "soon"}]}), "start"),
        (json.dumps({"id": "x", "utterances": [{"speaker": "a", "features": {"smell": [1]}}]}), "smell"),
    ],
)
def test_bad_rows_name_line_and_field(tmp_path: Path, row: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(conv("ok", 2)) + "\n" + row + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert ":2" in str(err.value) and needle in str(err.value)


def test_unknown_label_and_wrong_dim_are_errors(tmp_path: Path) -> None:
    c = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [conv("c0", 3)]))[0]
    with pytest.raises(DataError, match="label"):
        encode_conversation(c, {}, {}, ["neg"], 9)
    with pytest.raises(DataError, match="shape"):
        encode_conversation(c, {"audio": inline_features(c, "audio")}, {"audio": 4}, ["neg", "pos"], 9)


def test_speaker_ids_by_first_appearance_with_cap() -> None:
    assert speaker_ids(["Ross", "Rachel", "Ross", "Joey", "Monica"], 3).tolist() == [0, 1, 0, 2, 2]


def test_collate_pads_and_masks(tmp_path: Path) -> None:
    convs = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [conv("c0", 3), conv("c1", 5)]))
    enc = [
        encode_conversation(c, {"audio": inline_features(c, "audio")}, {"audio": 3}, ["neg", "pos"], 9) for c in convs
    ]
    batch = collate(enc, ["audio"])
    assert batch.features["audio"].shape == (2, 5, 3)
    assert batch.mask.sum().item() == 8
    assert (batch.labels[0, 3:] == IGNORE_INDEX).all()
    assert not batch.present[0, 3:].any()
    shuffled = [b.mask.shape[0] for b in iterate_batches(enc, 1, ["audio"], shuffle=True, rng=np.random.default_rng(0))]
    assert shuffled == [1, 1]
    assert torch.equal(batch.available, batch.present)


@pytest.mark.shared
def test_reads_every_shared_split() -> None:
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present")
    for name in ("meld7", "iemocap6", "iemocap4", "mosi2"):
        info = json.loads((SHARED / name / "dataset.json").read_text())
        for split in ("train", "dev"):
            convs = read_jsonl(SHARED / name / f"{split}.jsonl")
            assert len(convs) == info["splits"][split]["conversations"]
            assert sum(len(c.utterances) for c in convs) == info["splits"][split]["utterances"]
