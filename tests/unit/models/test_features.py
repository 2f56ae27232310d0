"""The encoding a saved model was trained with: pinned hashes, vocabularies with an "unknown"
row, standardised numbers with missing values at the mean, load buckets."""

import pytest
import torch

from swarmx.models.features import (
    CALL_FEATURES,
    PLACE_FEATURES,
    Encoder,
    FeatureConfig,
    ngram_buckets,
)
from swarmx.models.query import Query, SessionContext, place_of
from tests.unit.models.test_predictor import query

CFG = FeatureConfig()


def test_ngram_hashes_are_pinned():
    """Every saved model's embeddings are indexed by these: a change breaks them all."""
    assert ngram_buckets("Fix the failing test", 1 << 15, 256) == [
        *(19829, 27500, 31799, 31935, 26611, 11049, 22193, 31380, 20445, 25438, 22221, 16079),
        *(28605, 19632, 8248, 25764, 7661, 22420, 7597, 29854, 5397, 26032, 3680, 22926),
    ]


def test_ngrams_are_distinct_and_keep_a_long_prompts_head_and_tail():
    grams = ngram_buckets("the the the", 1 << 15, 256)
    assert len(grams) == len(set(grams))
    words = ["head", *(f"w{i}" for i in range(1000)), "tail"]
    kept = set(ngram_buckets(" ".join(words), 1 << 15, 16))
    assert set(ngram_buckets("head", 1 << 15, 16)) <= kept
    assert set(ngram_buckets("tail", 1 << 15, 16)) <= kept
    assert not set(ngram_buckets("w500", 1 << 15, 16)) <= kept
    assert ngram_buckets("", 1 << 15, 16) == []


def test_feature_config_sorts_levels():
    assert FeatureConfig(levels=(0.99, 0.5, 0.9)).levels == (0.5, 0.9, 0.99)
    with pytest.raises(ValueError, match="levels"):
        FeatureConfig(levels=(0.5, 1.0))


def fitted() -> Encoder:
    return Encoder.fit(
        CFG,
        [
            query(model="large", gpu="H100", input_kinds=["text"]),
            query(model="small", gpu="A10", kind="vision", input_kinds=["image"]),
            query(session=SessionContext(2, 300, 4.0, 1.2, 250.0), inflight=4),
        ],
    )


def test_vocabularies_are_sorted_with_row_0_unknown():
    enc = fitted()
    assert enc.vocab.models == ["large", "small"]
    assert enc.vocab.gpus == ["A10", "H100"]
    calls = enc.encode_calls([query(model="small", kind="vision"), query(model="new", kind="x")])
    assert calls.model.tolist() == [2, 0] and calls.kind.tolist() == [2, 0]
    image = enc.encode_calls([query(input_kinds=["image", "unheard-of"])]).inputs
    assert image.tolist() == [[1.0, 1.0, 0.0]]  # column 0: kinds not in the vocabulary


def test_call_encoding():
    enc = fitted()
    known, novel = query(), query(prompt="Zzyzx qwqw jjkv pfft")
    calls = enc.encode_calls([known, novel, query(prompt="")])
    assert calls.num.shape == (3, CALL_FEATURES)
    assert calls.novelty.tolist() == [0.0, 1.0, 0.0]
    assert calls.counts[1] == 0 and bool(enc.seen[calls.ids].all())  # unseen: dropped
    assert calls.counts[0] == len(ngram_buckets(known.prompt, CFG.hash_buckets, CFG.max_words))
    # a session with no history: missing values sit at the mean, standardised to 0
    assert bool(torch.isfinite(calls.num).all())
    one = calls.take(torch.tensor([0]))
    assert torch.equal(one.ids, enc.encode_calls([known]).ids)


def test_place_encoding_and_load_buckets():
    enc = fitted()
    places = [("H100", 0.5, 0.5, 0.5, load, 0) for load in (0, 1, 2, 3, 7, 8, 40)]
    encoded = enc.encode_places(places)
    assert encoded.bucket.tolist() == [0, 1, 1, 2, 2, 3, 3]  # 0, 1-2, 3-7, 8+
    assert encoded.gpu.tolist() == [2] * 7
    assert encoded.num.shape == (7, PLACE_FEATURES)
    # cached prompt tokens are the last column, and no part of the load
    cached = enc.encode_places(places[:2], [0, 5000])
    assert cached.bucket.tolist() == [0, 1]
    assert cached.num[1, -1] > cached.num[0, -1]
    assert torch.equal(cached.num[:, :-1], encoded.num[:2, :-1])
    calls, same = enc.encode([query(gpu="A10")])
    assert same.gpu.tolist() == [1]
    assert enc.encode_places([place_of(query(gpu="A10"))]).gpu.tolist() == [1]
    assert calls.num.shape[0] == 1


def test_a_prompt_scored_again_is_not_hashed_again_and_the_cache_stays_bounded(monkeypatch):
    from swarmx.models import features

    enc = fitted()
    hashed = []
    real = features.ngram_buckets
    monkeypatch.setattr(features, "ngram_buckets", lambda t, *a: hashed.append(t) or real(t, *a))
    monkeypatch.setattr(features, "TEXTS_CACHED", 2)
    q = Query("small", "llm", "brand new words", 10, 10)
    first = enc.call_fields(q)
    assert repr(enc.call_fields(q)) == repr(first) and hashed == ["brand new words"]  # NaNs
    for text in ("a b", "c d", "brand new words"):  # it aged out
        enc.call_fields(Query("small", "llm", text, 10, 10))
    assert hashed == ["brand new words", "a b", "c d", "brand new words"]
    assert len(enc._texts) == 2
    enc.grow([q])  # its n-grams are seen now: not what the cache said
    assert enc.call_fields(q)[1][-1] == 0.0 < first[1][-1]


def test_grow_appends_new_names_and_marks_their_ngrams_seen():
    enc = fitted()
    new = Query("huge", "llm", "brand new words", 10, 10, gpu="B200", input_kinds=["audio"])
    assert enc.grow([new, query()]) == {"models": 1, "gpus": 1, "inputs": 1}
    assert enc.vocab.models == ["large", "small", "huge"]
    assert enc.encode_calls([new]).novelty.tolist() == [0.0]
    assert enc.grow([new]) == {}
