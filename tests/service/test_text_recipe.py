"""The one-command recipe: defaults follow the dataset's shape; the user's flags win."""

import json
from pathlib import Path

from service.offline.text_recipe import dataset_shape, text_recipe, turn_tokens_for
from service.offline.training import training_defaults


def write(folder: Path, name: str, turns: int, speakers: int, convs: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"name": name, "labels": ["a", "b"]}))
    rows = [
        {"id": f"c{c}", "utterances": [{"id": f"u{i}", "speaker": f"s{i % speakers}", "text": "hi", "label": "a"}
                                       for i in range(turns)]}
        for c in range(convs)
    ]  # fmt: skip
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_long_dialogues_read_a_long_past_in_conversation_mode(tmp_path: Path) -> None:
    shape = dataset_shape(write(tmp_path / "d", "talks", 48, 2))
    assert (shape.conversations, shape.mean_turns, shape.mean_speakers) == (6, 48.0, 2.0)
    chosen, why = text_recipe(shape)
    assert chosen["mode"] == "conversation" and chosen["windowed"] and chosen["past"] >= 8
    assert (chosen["past"] + chosen["chunk"]) * (chosen["turn_tokens"] + 1) + 1 <= 512  # fits the positions
    assert "48.0 turns" in why and "4 epochs" in why  # 288 utterances: a small dataset


def test_short_scenes_read_pairs(tmp_path: Path) -> None:
    chosen, why = text_recipe(dataset_shape(write(tmp_path / "d", "scenes", 9, 4)))
    assert chosen["mode"] == "pairs" and chosen["past"] == 2 and "9.0 turns" in why


def test_turn_tokens_fit_the_position_table() -> None:
    for past, chunk in ((8, 8), (12, 4), (16, 8), (2, 4)):
        tokens = turn_tokens_for(past, chunk)
        assert (past + chunk) * (tokens + 1) + 1 <= 512 and tokens <= 48


def test_unknown_datasets_take_the_defaults_of_the_family_they_resemble(tmp_path: Path) -> None:
    short = write(tmp_path / "s", "emoryx", 12, 4)
    values, model = training_defaults("sdt", "emoryx", short, finetuned=True, progress=False)
    assert values["lr"] == 1e-4 and values["batch_size"] == 16 and model == {"temperature": 8.0}
    values, model = training_defaults("sdt", "longx", write(tmp_path / "l", "longx", 50, 2), True, progress=False)
    assert values["class_weights"] and model == {}  # IEMOCAP's SDT defaults
    known, _ = training_defaults("sdt", "meld7", short, finetuned=True, progress=False)
    assert known["lr"] == 5e-6  # a known family keeps its recorded defaults (bundles stay reproducible)
