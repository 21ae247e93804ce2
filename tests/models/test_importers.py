"""MELD CSV importer: a small CSV written here, and conventions of ../shared/data/meld7."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from models.importers import (
    MELD7_LABELS,
    fix_mojibake,
    import_meld_csv,
    import_meld_dir,
    parse_time,
    read_jsonl,
    write_dataset_json,
    write_jsonl,
)

SHARED_MELD = Path(__file__).resolve().parents[3] / "shared" / "data" / "meld7"
HEADER = [
    "Sr No.",
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
    "Episode",
    "StartTime",
    "EndTime",
]
# Out of order on purpose: dialogue 1 before 0, utterance 1 before 0.
ROWS = [
    ["3", "Oh, yeah, sure, right.", "Ross", "anger", "negative", "1", "0", "3", "5", "0:01:02,500", "0:01:04,000"],
    ["2", "You\x92re kidding\x85 café, «no»", "Monica", "Surprise", "positive", "0", "1", "8", "21", "", ""],
    [
        "1",
        "I donâ€™t know, â€œitâ€\x9d, say Ã©",
        "Chandler",
        "neutral",
        "neutral",
        "0",
        "0",
        "8",
        "21",
        "00:16:16,059",
        "00:16:21,731",
    ],
]


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    return path


def test_fix_mojibake_and_parse_time() -> None:
    assert fix_mojibake("it\x92s \x93ok\x94\x97fine\x85") == "it’s “ok”—fine…"
    assert fix_mojibake("donâ€™t Ã© â\x80\x99 â€") == "don’t é ’ ”"
    clean = "Already fine: don’t, café, naïve — “quoted” …"
    assert fix_mojibake(clean) == clean
    assert parse_time("00:16:16,059") == 976.059
    assert parse_time("1:02.5") == 62.5
    assert parse_time("") is None and parse_time("n/a") is None and parse_time(None) is None


def test_import_small_csv(tmp_path: Path) -> None:
    convs = import_meld_csv(_write_csv(tmp_path / "dev_sent_emo.csv", ROWS))
    assert [c["id"] for c in convs] == ["meld-dev-dia0", "meld-dev-dia1"]
    first = convs[0]
    assert first["dataset"] == "meld7" and first["split"] == "dev"
    assert first["media"] == {"season": 8, "episode": 21}
    assert [u["id"] for u in first["utterances"]] == ["dia0_utt0", "dia0_utt1"]
    u0, u1 = first["utterances"]
    assert u0 == {
        "id": "dia0_utt0",
        "speaker": "Chandler",
        "text": "I don’t know, “it”, say é",
        "start": 976.059,
        "end": 981.731,
        "label": "neutral",
        "sentiment": "neutral",
    }
    assert u1["text"] == "You’re kidding… café, «no»"
    assert (u1["start"], u1["end"], u1["label"]) == (None, None, "surprise")
    assert convs[1]["utterances"][0]["text"] == "Oh, yeah, sure, right."
    assert convs[1]["utterances"][0]["start"] == 62.5

    out = write_jsonl(convs, tmp_path / "out" / "dev.jsonl")
    assert read_jsonl(out) == convs
    assert "’" in out.read_text(encoding="utf-8")  # not \u-escaped

    info = json.loads(write_dataset_json(tmp_path / "out", {"dev": convs}).read_text(encoding="utf-8"))
    assert info["name"] == "meld7" and info["labels"] == list(MELD7_LABELS)
    assert info["splits"]["dev"]["conversations"] == 2 and info["splits"]["dev"]["utterances"] == 3
    assert info["splits"]["dev"]["label_counts"]["surprise"] == 1


def test_import_cp1252_file_and_errors(tmp_path: Path) -> None:
    # A file saved as cp1252 (not valid UTF-8): the apostrophe is the single byte 0x92.
    line = '1,It’s fine,Joey,joy,positive,4,0,1,1,"00:00:01,000","00:00:02,000"'
    path = tmp_path / "x.csv"
    path.write_bytes((",".join(HEADER) + "\r\n" + line + "\r\n").encode("cp1252"))
    assert b"\x92" in path.read_bytes()
    (conv,) = import_meld_csv(path, "test")
    assert conv["id"] == "meld-test-dia4"
    assert conv["utterances"][0]["text"] == "It’s fine" and conv["utterances"][0]["end"] == 2.0

    with pytest.raises(ValueError, match="unknown emotion"):
        import_meld_csv(_write_csv(tmp_path / "train_sent_emo.csv", [[*ROWS[0][:3], "happy", *ROWS[0][4:]]]))
    with pytest.raises(ValueError, match="repeated"):
        import_meld_csv(_write_csv(tmp_path / "a.csv", [ROWS[0], ROWS[0]]), "train")
    with pytest.raises(ValueError, match="split"):
        import_meld_csv(_write_csv(tmp_path / "b.csv", ROWS))
    (tmp_path / "c.csv").write_text("Utterance,Speaker\nhi,Joey\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing columns"):
        import_meld_csv(tmp_path / "c.csv", "dev")


def test_import_meld_dir(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train_sent_emo.csv", ROWS)
    _write_csv(tmp_path / "dev_sent_emo.csv", ROWS[:1])
    written = import_meld_dir(tmp_path, tmp_path / "meld7")
    assert sorted(written) == ["dataset.json", "dev", "train"]
    info = json.loads(written["dataset.json"].read_text(encoding="utf-8"))
    assert {k: v["utterances"] for k, v in info["splits"].items()} == {"train": 3, "dev": 1}
    assert read_jsonl(written["train"])[0]["id"] == "meld-train-dia0"


def _time_string(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED_MELD / "dev.jsonl").exists(), reason="../shared/data/meld7 absent")
def test_conventions_match_shared_meld_dev(tmp_path: Path) -> None:
    shared = read_jsonl(SHARED_MELD / "dev.jsonl")
    info = json.loads((SHARED_MELD / "dataset.json").read_text(encoding="utf-8"))
    assert info["labels"] == list(MELD7_LABELS)
    for conv in shared:
        dia = re.fullmatch(r"meld-dev-dia(\d+)", conv["id"]).group(1)
        assert all(re.fullmatch(rf"dia{dia}_utt\d+", u["id"]) for u in conv["utterances"])
        for u in conv["utterances"]:
            assert fix_mojibake(u["text"]) == u["text"]  # clean text is left alone

    # Rebuild MELD-style CSV rows (mojibake, hh:mm:ss,mmm times) from the shared
    # conversations; the import must give back the same records.
    sample = shared
    rows = []
    for conv in sample:
        dia = conv["id"].rsplit("dia", 1)[1]
        for u in conv["utterances"]:
            rows.append(
                [
                    str(len(rows) + 1),
                    u["text"].replace("’", "\x92").replace("…", "â€¦").replace("—", "â\x80\x94").replace("“", "\x93"),
                    u["speaker"],
                    u["label"],
                    u["sentiment"],
                    dia,
                    u["id"].rsplit("utt", 1)[1],
                    str(conv["media"]["season"]),
                    str(conv["media"]["episode"]),
                    _time_string(u["start"]),
                    _time_string(u["end"]),
                ]
            )
    ours = import_meld_csv(_write_csv(tmp_path / "dev_sent_emo.csv", rows))
    for conv in sample:  # the shared files carry float noise (15.556000000000001); ours are rounded
        for u in conv["utterances"]:
            u["start"], u["end"] = round(u["start"], 3), round(u["end"], 3)
    assert ours == sample
