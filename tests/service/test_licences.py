"""Terms a bundle inherits from its training corpora (service/licences.py)."""

from __future__ import annotations

from service.licences import bundle_terms, training_corpora


def test_multi_dataset_bundle_inherits_the_non_commercial_terms() -> None:
    manifest = {"dataset": {"name": "meld7+ravdess8+emodb7"}}
    assert training_corpora(manifest) == ["meld7", "ravdess8", "emodb7"]
    terms = bundle_terms(manifest)
    assert terms["non_commercial"] and "NON-COMMERCIAL" in terms["licence"]
    assert "CC BY-NC-SA 4.0" in terms["licence"] and "Emo-DB" in terms["licence"]


def test_research_only_and_unknown_corpora() -> None:
    emodb = bundle_terms({"dataset": {"name": "emodb7"}})
    assert not emodb["non_commercial"] and "research use" in emodb["licence"]
    assert bundle_terms({"dataset": {"name": "ravdess8-noisy"}})["non_commercial"]  # a degraded copy is still RAVDESS
    assert bundle_terms({"dataset": {"name": "mydata"}}) == {"licence": None, "non_commercial": False}
    assert bundle_terms({}) == {"licence": None, "non_commercial": False}
