"""The network's outputs are monotone by construction, its vocabulary tables grow from the
"unknown" row, and its parameter names (a model file's keys) stay put."""

import torch

from swarmx.models.features import CALL_FEATURES, PLACE_FEATURES, Calls, FeatureConfig, Vocab
from swarmx.models.net import QuantileNet, monotone

CFG = FeatureConfig(hash_buckets=64, embed_dim=4, hidden=8, head_hidden=4, ensemble=2)


def test_monotone_for_any_raw_output():
    out = monotone(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 10)
    assert bool((out[:, 1:] >= out[:, :-1]).all())


def test_parameter_names_are_the_model_files_keys():
    net = QuantileNet(CFG, Vocab(models=["m"]), torch.Generator().manual_seed(0))
    assert list(net.state_dict()) == [
        *("model", "workflow", "gpu", "kind", "inputs"),
        *("w1", "b1", "w2", "b2", "wp", "w3", "b3", "w4", "b4", "wo", "bo", "text.weight"),
    ]


def test_forward_shapes_and_monotone_members():
    net = QuantileNet(CFG, Vocab(models=["m"], gpus=["g"]), torch.Generator().manual_seed(0))
    n = 3
    calls = Calls(
        ids=torch.tensor([1, 2, 3]),
        counts=torch.tensor([2, 0, 1]),
        model=torch.tensor([0, 1, 1]),
        workflow=torch.tensor([0, 5, 9]),
        kind=torch.zeros(n, dtype=torch.long),
        inputs=torch.zeros(n, 1),
        num=torch.randn(n, CALL_FEATURES),
        novelty=torch.tensor([0.0, 1.0, 0.5]),
    )
    with torch.no_grad():
        call = net.call_part(calls, calls.ids, torch.tensor([0, 2, 2]), calls.novelty, calls.model)
        out = net.head(call, torch.tensor([0, 1, 1]), torch.randn(n, PLACE_FEATURES))
    assert call.shape == (CFG.ensemble, n, CFG.hidden)
    assert out.shape == (CFG.ensemble, n, len(CFG.levels))
    with torch.no_grad():
        tokens = net.output_head(call)  # the output-length head: the call alone
    assert tokens.shape == (CFG.ensemble, n, len(CFG.levels))
    assert bool((tokens.diff(dim=2) >= 0).all())
    assert bool((out[..., 1:] >= out[..., :-1]).all())


def test_grow_starts_new_rows_as_unknown():
    net = QuantileNet(CFG, Vocab(models=["m"], inputs=["text"]), torch.Generator().manual_seed(0))
    net.grow({"models": 2, "inputs": 1})
    assert net.model.shape[0] == 4 and torch.equal(net.model[2], net.model[0])
    assert torch.equal(net.model[3], net.model[0])
    assert net.inputs.shape[0] == 3 and not bool(net.inputs[2].any())  # no effect yet
    assert any(p is net.model for p in net.parameters())  # registered, so it trains
