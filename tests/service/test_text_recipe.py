"""The one-command recipe: defaults follow the dataset's shape; the user's flags win."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from models.text_finetune import ContextWindow
from service.offline.text_finetuning import check_positions
from service.offline.text_recipe import dataset_shape, text_recipe
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


def test_long_dialogues_read_a_longer_past(tmp_path: Path) -> None:
    shape = dataset_shape(write(tmp_path / "d", "talks", 48, 2))
    assert (shape.conversations, shape.mean_turns, shape.mean_speakers) == (6, 48.0, 2.0)
    chosen, why = text_recipe(shape)
    assert chosen["mode"] == "pairs" and chosen["past"] == 3 and chosen["max_length"] == 96
    assert "48.0 turns" in why and "4 epochs" in why  # 288 utterances: a small dataset


def test_short_scenes_read_pairs(tmp_path: Path) -> None:
    chosen, why = text_recipe(dataset_shape(write(tmp_path / "d", "scenes", 9, 4)))
    assert chosen["mode"] == "pairs" and chosen["past"] == 2 and "9.0 turns" in why


def test_a_conversation_chunk_longer_than_the_positions_is_refused() -> None:
    bert = SimpleNamespace(model_type="bert", max_position_embeddings=512)
    check_positions(ContextWindow(past=8, chunk=8, turn_tokens=30, mode="conversation"), bert)  # 497 fits
    with pytest.raises(ValueError, match="use --turn-tokens 30 or fewer"):
        check_positions(ContextWindow(past=8, chunk=8, turn_tokens=48, mode="conversation"), bert)
    mpnet = SimpleNamespace(model_type="mpnet", max_position_embeddings=514)  # 2 of them the padding offset
    with pytest.raises(ValueError, match="512 positions"):
        check_positions(ContextWindow(past=16, chunk=8, turn_tokens=30, mode="conversation"), mpnet)
    check_positions(ContextWindow(past=16, max_length=512), bert)  # pairs are truncated to max_length


def test_unknown_datasets_take_the_defaults_of_the_family_they_resemble(tmp_path: Path) -> None:
    short = write(tmp_path / "s", "emoryx", 12, 4)
    values, model = training_defaults("sdt", "emoryx", short, finetuned=True, progress=False)
    assert values["lr"] == 1e-4 and values["batch_size"] == 16 and model == {"temperature": 8.0}
    values, model = training_defaults("sdt", "longx", write(tmp_path / "l", "longx", 50, 2), True, progress=False)
    assert values["class_weights"] and model == {}  # IEMOCAP's SDT defaults
    known, _ = training_defaults("sdt", "meld7", short, finetuned=True, progress=False)
    assert known["lr"] == 5e-6  # a known family keeps its recorded defaults (bundles stay reproducible)
