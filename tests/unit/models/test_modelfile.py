"""A model file round-trips exactly, holds only tensors and plain data, and refuses what is not
one of its format."""

import pytest
import torch

from swarmx.models import modelfile
from swarmx.models.predictor import QuantilePredictor
from swarmx.models.query import queries
from tests.unit.models.test_predictor import fresh, query, synth


def test_round_trip_predicts_the_same(tmp_path):
    records = synth(40, seed=2)
    model = fresh(records)
    latency = torch.log(torch.tensor([r.latency_s for r in records]))
    model.fit_marginal(model.encoder.encode_calls(queries(records)).model, latency)
    model.calibrate(queries(records), [r.latency_s for r in records])
    model.novelty_shift[3] += 0.2
    model.version, model.metrics = "q-test", {"n_train": 3, "coverage": {"0.9": 0.9}}
    model.extras["baselines"] = {"empirical": {"overall": [1.0, 2.0]}}
    model.set_online_shift({0.9: 0.1})
    path = tmp_path / "m.pt"
    model.save(path)
    saved = torch.load(path, weights_only=True)  # tensors and plain data only: runs no code
    assert saved["format"] == modelfile.FORMAT == 1
    back = QuantilePredictor.load(path)
    qs = [*queries(records), query(model="unseen", prompt=""), query(prompt="qqzx wvvk ffjj")]
    assert torch.equal(back.predict_log(qs), model.predict_log(qs))
    assert back.predict_candidates(qs[0], [("H100", 0.5, 0.5, 0.5, 3, 1)]) == (
        model.predict_candidates(qs[0], [("H100", 0.5, 0.5, 0.5, 3, 1)])
    )
    assert (back.version, back.metrics, back.extras) == (model.version, model.metrics, model.extras)
    assert back.cfg == model.cfg and back.encoder.vocab == model.encoder.vocab
    assert back.digest() == model.digest()
    assert back.marginal is not None and model.marginal is not None
    assert torch.equal(back.marginal, model.marginal)
    assert torch.equal(back.novelty_shift, model.novelty_shift)


def test_digest_follows_the_weights():
    model = fresh(synth(20, seed=3))
    other = model.copy()
    assert other.digest() == model.digest()
    with torch.no_grad():
        other.net.b4.add_(1.0)
    assert other.digest() != model.digest()


@pytest.mark.parametrize("content", [{"format": 2}, [1, 2, 3]])
def test_other_files_are_refused(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a swarmx quantile predictor"):
        QuantilePredictor.load(path)
