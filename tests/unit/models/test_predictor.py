"""The neural quantile predictor on synthetic agent traces with a known answer: latency grows with
the prompt's size, its wording ("a detailed report" vs "one sentence"), the model and the
replica's load, times a per-session factor and lognormal noise."""

import dataclasses
import math
import random

import pytest
import torch

from swarmx.models.features import FeatureConfig
from swarmx.models.predictor import QuantilePredictor
from swarmx.models.query import Query, SessionContext, place_of, queries
from swarmx.models.train import TrainReport, fine_tune, train
from swarmx.tracefmt import split_by_session
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord

CFG = FeatureConfig(hash_buckets=1 << 12, embed_dim=16, hidden=48, ensemble=3, novelty_p=0.6)
"""Small and fast; a little more n-gram dropout than the default, so that a model trained on
a few thousand calls learns the novelty effect reliably."""
BASE_S = {"small": 0.5, "large": 2.0, "huge": 6.0}
TOPICS = ("databases", "compilers", "gardening", "tax law", "gpu kernels", "poetry", "networks")
LOADS = (0, 0, 0, 1, 2, 4, 8, 12)


def prompt(detailed: bool, topic: str) -> str:
    if detailed:
        return f"Write a detailed report about {topic}, covering every aspect."
    return f"Explain {topic} in one sentence."


def synth(
    n_sessions: int, seed: int, models: tuple[str, ...] = ("small", "large")
) -> list[TraceRecord]:
    rng = random.Random(seed)
    out = []
    for s in range(n_sessions):
        model, factor = rng.choice(models), math.exp(rng.gauss(0, 0.15))
        ts = s * 1e4
        for turn in range(rng.randint(4, 10)):
            detailed, tokens, load = rng.random() < 0.5, rng.randint(50, 4000), rng.choice(LOADS)
            latency = (
                BASE_S[model]
                * (1 + tokens / 2000)
                * (4.0 if detailed else 1.0)
                * (1 + 0.1 * load)
                * factor
                * math.exp(rng.gauss(0, 0.3))
            )
            out.append(
                TraceRecord(
                    ts=ts,
                    workflow=f"wf{seed}-{s}",
                    step=f"s{turn}",
                    deps=[],
                    kind="llm",
                    model=model,
                    prompt=prompt(detailed, rng.choice(TOPICS)),
                    prompt_tokens=tokens,
                    max_tokens=1024,
                    output_tokens=int(40 * latency),
                    latency_s=latency,
                    queue_s=0.0,
                    ttft_s=None,
                    node="n",
                    replica=f"n/{model}",
                    device=DeviceAtDispatch("H100", 0.5, 0.3, 0.2),
                    runtime=RuntimeAtDispatch(load, 0),
                    turn=turn,
                    workflow_name="chat",
                    input_kinds=["text"],
                )
            )
            ts += latency + 1.0
    return out


def query(**kw: object) -> Query:
    base = Query(
        model="large",
        kind="llm",
        prompt=prompt(False, "databases"),
        prompt_tokens=1000,
        max_tokens=1024,
        workflow_name="chat",
        input_kinds=["text"],
        gpu="H100",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def fresh(records: list[TraceRecord], cfg: FeatureConfig = CFG) -> QuantilePredictor:
    """An untrained predictor on ``records``: for tests of the plumbing, not of what it learns."""
    latency = torch.log(torch.tensor([r.latency_s for r in records]))
    return QuantilePredictor.fresh(cfg, queries(records), latency, seed=0)


@pytest.fixture(scope="module")
def trained() -> tuple[QuantilePredictor, TrainReport, list[TraceRecord]]:
    records = synth(800, seed=1)
    train_recs, test_recs = split_by_session(records, 0.2, seed=0)
    model, report = train(train_recs, CFG, seed=0, max_epochs=40, batch_size=256)
    return model, report, test_recs


def test_quantiles_monotone_for_random_inputs(trained):
    model = trained[0].copy()
    model.set_online_shift({0.5: 2.0, 0.95: -1.0})  # shifts that would cross without the guard
    rng = random.Random(3)
    words = ["the", "a", "report", "sentence", "detailed", "brief", "zebra", "quantum", "42"]
    busy = SessionContext(3, 400, 12.0, 1.0, 80.0)
    qs = [
        query(
            model=rng.choice(["small", "large", "never-seen"]),
            prompt=" ".join(rng.choices(words, k=rng.randint(0, 30))),
            prompt_tokens=rng.randint(0, 100_000),
            max_tokens=rng.randint(0, 8000),
            turn=rng.randint(0, 50),
            input_kinds=rng.sample(["text", "image", "tool_result"], rng.randint(0, 2)),
            prefix_share=rng.random(),
            gpu=rng.choice(["H100", "A10", "cpu"]),
            gpu_util=rng.random(),
            inflight=rng.randint(0, 40),
            queue_depth=rng.randint(0, 40),
            session=rng.choice([SessionContext(), busy]),
        )
        for _ in range(300)
    ]
    lq = model.predict_log(qs)
    assert lq.shape == (300, 4)
    assert bool(torch.isfinite(lq).all())
    assert bool((lq[:, 1:] >= lq[:, :-1]).all())
    assert all(d.levels == model.levels for d in model.predict(qs))  # LatencyDist checks order


def test_members_are_monotone_by_construction(trained):
    model = trained[0]
    calls, places = model.encoder.encode([query(), query(model="x", prompt="")])
    with torch.inference_mode():
        members = model.members(calls, places)
    assert members.shape == (CFG.ensemble, 2, 4)
    assert bool((members[..., 1:] >= members[..., :-1]).all())


def test_unknown_model_and_empty_prompt(trained):
    model = trained[0]
    qs = [query(model="small"), query(model="large"), query(model="brand-new"), query(prompt="")]
    dists = model.predict(qs)
    assert all(0 < d.values_s[0] <= d.values_s[-1] < math.inf for d in dists)
    lq = model.predict_log(qs)
    spread = lq[:, 1] - lq[:, 0]  # log(q90 / q50)
    assert spread[2] > spread[0] and spread[2] > spread[1]
    # its median lies between the known models' medians
    assert lq[0, 0] < lq[2, 0] < lq[1, 0]


def test_wording_moves_the_forecast(trained):
    model = trained[0]
    lq = model.predict_log(
        [query(prompt=prompt(False, "compilers")), query(prompt=prompt(True, "compilers"))]
    )
    # the truth is 4x (log 1.39) at every level
    assert 0.8 < float(lq[1, 0] - lq[0, 0]) < 2.0
    assert float(lq[1, 1] - lq[0, 1]) > 0.8


def test_unfamiliar_wording_is_novel_and_widens(trained):
    model = trained[0]
    known, novel = query(), query(prompt="Zzyzx qwqw jjkv pfft")
    calls = model.encoder.encode_calls([known, novel])
    assert float(calls.novelty[0]) == 0.0 and float(calls.novelty[1]) > 0.5
    assert bool(model.encoder.seen[calls.ids].all())  # unseen n-grams are dropped, not embedded
    lq = model.predict_log([known, novel])
    assert float(lq[1, 1] - lq[1, 0]) > float(lq[0, 1] - lq[0, 0])  # log(q90 / q50)
    assert float(lq[1, 3] - lq[1, 0]) > float(lq[0, 3] - lq[0, 0])  # log(q99 / q50)


def test_coverage_on_held_out_sessions(trained):
    model, report, test_recs = trained
    y = torch.log(torch.tensor([r.latency_s for r in test_recs])).unsqueeze(1)
    coverage = (y <= model.predict_log(queries(test_recs))).float().mean(0)
    for p, c in zip(model.levels, coverage.tolist(), strict=True):
        assert abs(c - p) < (0.06 if p < 0.95 else 0.04), (p, c)
    assert set(report.coverage) == set(model.levels)
    assert report.n_train > report.n_cal > 0 and report.n_val > 0 and report.epochs >= 1


def test_split_by_session_keeps_sessions_whole():
    records = synth(60, seed=4)
    for seed in range(3):
        rest, held = split_by_session(records, 0.25, seed)
        assert len(rest) + len(held) == len(records)
        assert not {r.session_id for r in rest} & {r.session_id for r in held}
        assert len({r.session_id for r in held}) == 15
    assert split_by_session(records, 0.25, 0) == split_by_session(records, 0.25, 0)


def test_fine_tune_learns_a_new_model(trained):
    model = trained[0]
    before_q = [query(model="huge"), query(model="large")]
    before = model.predict_log(before_q)
    recent = synth(120, seed=7, models=("huge", "large"))
    tuned = fine_tune(model, recent, epochs=3, seed=1)
    assert tuned is not model and tuned.version != model.version
    assert "huge" in tuned.encoder.vocab.models and "huge" not in model.encoder.vocab.models
    assert torch.equal(model.predict_log(before_q), before)  # the original is untouched
    after = tuned.predict_log(before_q)
    # "huge" is 3x "large": from the unknown (marginal) forecast towards that
    assert float(after[0, 0] - after[1, 0]) > float(before[0, 0] - before[1, 0]) + 0.3
    assert float(after[0, 0] - after[1, 0]) > 0.5
    assert tuned.metrics["fine_tuned_from"] == model.version
    # the new model's latency marginal (the novelty floor's) is its own, and higher
    marginal = tuned.marginal
    assert marginal is not None and marginal.shape[0] == len(tuned.encoder.vocab.models) + 1
    huge, large = (1 + tuned.encoder.vocab.models.index(m) for m in ("huge", "large"))
    assert float(marginal[huge, 63] - marginal[large, 63]) > 0.5


@pytest.mark.parametrize("q", [query(), query(session=SessionContext(2, 300, 4.0, 1.2, 250.0))])
def test_load_slows_calls_down(trained, q):
    idle, busy = ("H100", 0.1, 0.2, 0.3, 0, 0), ("cpu", 0.0, 0.0, 0.9, 12, 10)
    fast, slow = trained[0].predict_candidates(q, [idle, busy])
    assert slow.values_s[0] > fast.values_s[0]


def test_load_bucket_calibration(trained):
    model = trained[0].copy()
    light, heavy = query(inflight=0), query(inflight=9)
    base = model.predict_log([light, heavy])
    model.cal_shift[3] += 0.5  # bucket 8+
    moved = model.predict_log([light, heavy])
    assert torch.equal(moved[0], base[0])
    assert torch.allclose(moved[1], base[1] + 0.5)
    # calibrate(): a thin bucket falls back to the global shift, a full one gets its own
    recs = [r for r in synth(200, seed=9) if r.runtime.inflight in (0, 12)]
    thin = [r for r in recs if r.runtime.inflight == 12][:20]
    calib = [r for r in recs if r.runtime.inflight == 0] + thin
    model.calibrate(queries(calib), [r.latency_s for r in calib])
    shift = model.cal_shift
    assert torch.equal(shift[3], shift[1]) and torch.equal(shift[3], shift[2])  # global
    assert not torch.equal(shift[0], shift[3])


def test_online_shift(trained):
    model = trained[0].copy()
    q = [query()]
    base = model.predict_log(q)
    model.set_online_shift({0.99: 0.25})
    assert torch.allclose(model.predict_log(q)[0, 3], base[0, 3] + 0.25)
    assert torch.equal(model.predict_log(q)[0, :3], base[0, :3])
    with pytest.raises(ValueError, match="no such levels"):
        model.set_online_shift({0.42: 1.0})


def test_a_cached_prefix_shortens_the_forecast_where_it_is_held():
    """Calls whose prefill a replica's prefix cache cut short, as the traces record: the
    trained model forecasts the same call faster on the placement holding its prompt."""
    rng = random.Random(4)
    recs = []
    for r in synth(300, seed=3, models=("large",)):
        cached = rng.choice((0, 0, r.prompt_tokens * 9 // 10))
        uncached = r.prompt_tokens - cached
        latency = 0.2 + uncached / 500 * math.exp(rng.gauss(0, 0.1))  # prefill-bound calls
        recs.append(dataclasses.replace(r, latency_s=latency, cached_tokens=cached))
    model, _ = train(recs, CFG, seed=0, max_epochs=30, batch_size=256)
    place = ("H100", 0.5, 0.3, 0.2, 0, 0)
    q = query(prompt_tokens=3000)
    cold, warm = model.predict_candidates(q, [place, place], [0, 2700])
    assert warm.quantile(0.5) < 0.5 * cold.quantile(0.5)
    same = model.predict_candidates(q, [place, place])  # none said: as if nothing were held
    assert same[0].values_s == cold.values_s


def _saved_by_an_older_writer(
    tmp_path, cfg: FeatureConfig, missing: str
) -> tuple[QuantilePredictor, QuantilePredictor]:
    """A model trained with ``cfg``, and the same model loaded from a file whose config lacks
    ``missing`` (as the writer of the day left it)."""
    model, _ = train(synth(60, seed=2), cfg, seed=0, max_epochs=2)
    path = tmp_path / "old.pt"
    model.save(path)
    contents = torch.load(path, weights_only=True)
    del contents["config"][missing]
    torch.save(contents, path)
    return model, QuantilePredictor.load(path)


def test_a_model_file_from_before_the_session_features_still_loads(tmp_path):
    """Files saved before the session's stops and the serving side's state read 17 call
    columns (and widen by the ensemble's full spread, as they were trained to)."""
    old = FeatureConfig(levels=CFG.levels, call_features=17, spread=1.0)
    model, loaded = _saved_by_an_older_writer(tmp_path, old, "call_features")
    assert (loaded.cfg.call_features, loaded.cfg.spread) == (17, 1.0)
    place = ("H100", 0.5, 0.3, 0.2, 1, 0)
    busy = dataclasses.replace(
        query(), session=SessionContext(3, 10, 1.0, 0.0, 10.0, "tool", 2, 0.5, 9, 1.0, -2.0)
    )
    quiet = dataclasses.replace(busy, session=SessionContext(3, 10, 1.0, 0.0, 10.0))
    assert (
        loaded.predict_candidates(busy, [place])[0].values_s
        == loaded.predict_candidates(quiet, [place])[0].values_s
        == model.predict_candidates(quiet, [place])[0].values_s
    )  # the new columns are not read


def test_a_model_file_from_before_the_cache_feature_still_loads(tmp_path):
    """Files saved before cached tokens were a placement feature read five columns."""
    old = FeatureConfig(levels=CFG.levels, place_features=5)
    model, loaded = _saved_by_an_older_writer(tmp_path, old, "place_features")
    assert loaded.cfg.place_features == 5
    place = ("H100", 0.5, 0.3, 0.2, 1, 0)
    a, b = loaded.predict_candidates(query(), [place, place], [0, 5000])
    assert a.values_s == b.values_s  # the cache column is not read
    # one candidate against two: a batch of another size may round differently on some CPUs
    alone = model.predict_candidates(query(), [place])[0].values_s
    assert a.values_s == pytest.approx(alone, rel=1e-5)


def test_the_output_length_head_reads_the_prompt_and_covers_held_out_calls(trained):
    """Its own head, from the call alone: a detailed prompt's answer runs about four times as
    long as a brief one's (the synthetic traces' rule), wherever it runs."""
    model, _, test = trained
    detailed, brief = query(prompt=prompt(True, "databases")), query()
    long, short = model.predict_output_tokens([detailed, brief])
    assert 2.5 < long.quantile(0.5) / short.quantile(0.5) < 6
    elsewhere = dataclasses.replace(detailed, gpu="A100", inflight=7, queue_depth=3)
    assert model.predict_output_tokens([elsewhere])[0].values_s == long.values_s
    dists = model.predict_output_tokens(queries(test))
    covered = sum(r.output_tokens <= d.quantile(0.9) for r, d in zip(test, dists, strict=True))
    assert abs(covered / len(test) - 0.9) < 0.05
    assert all(v == int(v) for d in dists for v in d.values_s)  # whole tokens


def test_one_calls_output_tokens_on_the_routing_path_are_the_batch_paths(trained):
    """`output_tokens` (the folded trunk, what composing a forecast asks per decision) gives
    `predict_output_tokens`' whole tokens, to a token where the two summation orders round a
    quantile across a whole number."""
    model, _, test = trained
    qs = queries(test)[:200]
    for q, batch in zip(qs, model.predict_output_tokens(qs), strict=True):
        assert model.output_tokens(q).values_s == pytest.approx(batch.values_s, abs=1.0)


def test_the_output_lengths_calibration_comes_from_the_calls_that_generated_tokens():
    """Tool calls generate none: among many, their zeros would pull every level of the length
    forecast down and LLM answers would run past it. Calibrated on the same calls, the LLM
    calls' coverage is nominal whatever the share of tools."""
    llm = synth(60, seed=4)
    tools = [
        dataclasses.replace(r, kind="tool", model="shell", output_tokens=0, step=f"t{k}")
        for k, r in enumerate(synth(180, seed=5))
    ]
    records = llm + tools
    model = fresh(records)
    calls, places = model.encoder.encode(queries(records))
    log_latency = torch.log(torch.tensor([r.latency_s for r in records]))
    log_output = torch.log1p(torch.tensor([float(r.output_tokens) for r in records]))
    model.calibrate_encoded(calls, places, log_latency, log_output)
    dists = model.predict_output_tokens(queries(records))[: len(llm)]
    for k, level in enumerate(model.levels[:2]):
        covered = sum(r.output_tokens <= d.values_s[k] for r, d in zip(llm, dists, strict=True))
        assert abs(covered / len(llm) - level) < 0.06, level


def test_a_model_file_from_before_the_output_head_still_loads(tmp_path):
    """Files saved before it lack its weights: they load, forecast latency as they did, and
    say they have no output-length forecast rather than make one up."""
    model, _ = train(synth(60, seed=2), CFG, seed=0, max_epochs=2)
    path = tmp_path / "old.pt"
    model.save(path)
    contents = torch.load(path, weights_only=True)
    del contents["state"]["wo"], contents["state"]["bo"], contents["output_shift"]
    torch.save(contents, path)
    loaded = QuantilePredictor.load(path)
    assert loaded.output_shift is None
    assert loaded.predict([query()])[0].values_s == model.predict([query()])[0].values_s
    with pytest.raises(ValueError, match="no output-length head"):
        loaded.predict_output_tokens([query()])
    contents["state"]["stray"] = torch.zeros(1)
    torch.save(contents, path)
    with pytest.raises(ValueError, match="do not fit"):
        QuantilePredictor.load(path)


def _novel(prompt_text: str, extra: str = "zqxv kwyj blorft") -> str:
    """The prompt with words no training call had: a share of its n-grams unreadable."""
    return f"{prompt_text} {extra}"


def test_the_novelty_floor_lifts_only_the_upper_quantiles_of_unfamiliar_wording(trained):
    """A prompt a share ``nu`` unread is, with weight ``nu``, any call of its model: its
    p-quantile is at least that model's training marginal at (p - 1 + nu) / nu. Familiar
    wording and the levels that bound does not reach are left as they were; the routing path
    floors as the batch path does."""
    model = trained[0]
    blind = model.copy()
    blind.marginal = None
    familiar, novel, alien = (
        query(),
        query(prompt=_novel(prompt(False, "databases"))),
        query(prompt="zqxv kwyj blorft"),
    )
    calls = model.encoder.encode_calls([familiar, novel, alien])
    nu = calls.novelty.tolist()
    assert nu[0] == 0 and 0.2 < nu[1] < 0.8 and nu[2] > 0.85  # hashed n-grams may collide
    floor = model.novelty_floor(calls.novelty, calls.model)
    with_floor, without = (
        model.predict_log([familiar, novel, alien]),
        blind.predict_log([familiar, novel, alien]),
    )
    assert torch.equal(with_floor[0], without[0])
    assert bool((with_floor >= without).all()) and bool((with_floor >= floor).all())
    for k, p in enumerate(model.levels):
        if p <= 1 - nu[1]:
            assert floor[1, k] == -math.inf and with_floor[1, k] == without[1, k]
    # almost all unread: the model's own training marginal, almost level for level
    large = torch.tensor(
        [math.log(r.latency_s) for r in synth(800, seed=1) if r.model == "large"]
    )  # the fixture's records (the marginal saw its training share of them)
    for k, p in enumerate(model.levels):
        at = (p - 1 + nu[2]) / nu[2]
        assert float(floor[2, k]) == pytest.approx(float(torch.quantile(large, at)), abs=0.15)
    assert bool((floor[2, 1:] > without[2, 1:]).any())  # the floor bites somewhere
    routed = model.predict_candidates(novel, [place_of(novel)], [novel.cached_tokens])[0].values_s
    assert routed == pytest.approx(model.predict([novel])[0].values_s, rel=1e-5)


def test_each_novelty_bucket_is_calibrated_on_its_own_held_out_calls(trained):
    """Held-out calls in wording the model never saw run four times as long as it thinks: their
    novelty bucket gets its own shift, which covers new calls like them, while the familiar
    calls' load shifts come from the familiar calls alone and keep covering them."""
    model = trained[0].copy()

    def slow_and_novel(records: list[TraceRecord]) -> list[TraceRecord]:
        """Later than the familiar ones, not beside them: the serving side's last minute, a
        feature, would read their slowness."""
        return [
            dataclasses.replace(
                r, prompt=_novel(r.prompt), latency_s=4 * r.latency_s, ts=r.ts + 1e8
            )
            for r in records
        ]

    familiar = synth(150, seed=11)
    calib = familiar + slow_and_novel(synth(150, seed=12))
    model.calibrate(queries(calib), [r.latency_s for r in calib])
    buckets = model._novelty_bucket(model.encoder.encode_calls(queries(calib)).novelty)
    counts = torch.bincount(buckets, minlength=len(model.novelty_shift)).tolist()
    assert counts[0] == len(familiar)  # the novel wording: brief and detailed prompts, 1-2 buckets
    for b, n in enumerate(counts):
        unshifted = torch.equal(model.novelty_shift[b], torch.zeros(4))
        assert unshifted == (b == 0 or n < CFG.min_bucket_calls), (b, n)  # evidence, or none
    for test in (synth(150, seed=13), slow_and_novel(synth(150, seed=14))):
        y = torch.log(torch.tensor([r.latency_s for r in test])).unsqueeze(1)
        coverage = (y <= model.predict_log(queries(test))).float().mean(0).tolist()
        assert abs(coverage[0] - 0.5) < 0.08 and abs(coverage[1] - 0.9) < 0.06, coverage


def test_a_model_file_from_before_the_novelty_floor_still_loads(tmp_path):
    """Files saved before it have no marginal, novelty shifts or novelty edges: they load and
    forecast as they did, unfamiliar wording without a floor."""
    model, _ = train(synth(60, seed=2), CFG, seed=0, max_epochs=2)
    assert model.marginal is not None and model.marginal.shape[0] == 3  # unknown, large, small
    path = tmp_path / "old.pt"
    model.save(path)
    contents = torch.load(path, weights_only=True)
    del contents["marginal"], contents["novelty_shift"], contents["config"]["novelty_edges"]
    torch.save(contents, path)
    loaded = QuantilePredictor.load(path)
    assert loaded.marginal is None and loaded.cfg.novelty_edges == CFG.novelty_edges
    novel = query(prompt="zqxv kwyj blorft")
    blind = model.copy()
    blind.marginal = None
    assert loaded.predict([query(), novel]) == blind.predict([query(), novel])


@pytest.mark.parametrize(
    ("key", "bad", "match"),
    [
        ("marginal", torch.zeros(2, 8), r"marginal: expected \[3, n\]"),  # a model's row missing
        ("marginal", torch.full((3, 8), math.nan), "marginal: expected"),
        ("marginal", torch.arange(24.0).flip(0).view(3, 8), "must not decrease"),
        ("marginal", "not a tensor", "marginal: expected .* got str"),
        ("novelty_shift", torch.zeros(2, 4), r"novelty_shift: expected \[5, 4\]"),
        ("novelty_shift", torch.full((5, 4), math.inf), "novelty_shift: expected"),
    ],
)
def test_a_model_file_whose_novelty_floor_would_break_forecasts_is_refused(
    tmp_path, key, bad, match
):
    """A marginal or novelty shifts of the wrong shape, not finite or out of order would make
    every forecast raise or come out NaN in the routing loop: the file is refused at load."""
    model, _ = train(synth(60, seed=2), CFG, seed=0, max_epochs=1)
    path = tmp_path / "m.pt"
    model.save(path)
    contents = torch.load(path, weights_only=True)
    contents[key] = bad
    torch.save(contents, path)
    with pytest.raises(ValueError, match=match):
        QuantilePredictor.load(path)


@pytest.mark.parametrize("edges", [(0.3, 0.1), (0.0, 0.5), (0.2, 1.5), (0.2, 0.2)])
def test_novelty_edges_must_increase_within_0_and_1(edges):
    with pytest.raises(ValueError, match="novelty_edges"):
        FeatureConfig(novelty_edges=edges)
