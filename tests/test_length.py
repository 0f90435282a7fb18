"""Tests of opd/length/: statistics against hand-computed values, the detector on seeded
synthetic rollout streams, each penalty's numbers, and LengthMonitor in each mode."""
import json
import math

import numpy as np
import pytest

from opd.length import (
    CONDITIONS, DetectorConfig, LengthConfig, LengthDetector, LengthEvent, LengthMonitor, PenaltyConfig,
    PenaltyPlan, ReferenceLengths, StatsConfig, adaptive_max_new_tokens, apply_sequence_penalty,
    length_ratio_penalty, loss_weights, overlong_penalty, reference_lengths, rejection_badness,
    repetitive_flags, rollout_stats, stop_properly_weights, tail_repeat_fraction)

EOS = 0
VOCAB = 5000
MAX_NEW = 256
REF = 60.0


# ------------------------------------------------------------------ synthetic rollouts


def make_batch(rng, n=40, mean_len=60.0, sd=10.0, trunc=0.0, rep=0.0, no_eos=0.0,
               max_new=MAX_NEW):
    """Exactly round(frac * n) truncated, then repetitive, then stop-string (no EOS)
    rollouts; the rest are varied and end in EOS. Lengths ~ N(mean_len, sd)."""
    k_t, k_r, k_e = (round(f * n) for f in (trunc, rep, no_eos))
    token_ids, reasons = [], []
    for i in range(n):
        if i < k_t:
            token_ids.append(rng.integers(1, VOCAB, max_new).tolist())
            reasons.append("length")
            continue
        body_len = int(np.clip(round(rng.normal(mean_len, sd)), 2, max_new - 1))
        if i < k_t + k_r:  # varied prefix, then a period-2 loop filling the tail
            body_len = max(body_len, 32)
            body = rng.integers(1, VOCAB, body_len - 32).tolist() + [7, 8] * 16
        else:
            body = rng.integers(1, VOCAB, body_len).tolist()
        no_eos_here = k_t + k_r <= i < k_t + k_r + k_e
        token_ids.append(body if no_eos_here else body + [EOS])
        reasons.append("stop")
    return token_ids, reasons


def stats_of(batch, reference_mean=REF, max_new=MAX_NEW, **kw):
    return rollout_stats(batch[0], batch[1], {EOS}, max_new, StatsConfig(**kw), reference_mean=reference_mean)


def run(detector, specs, seed=0, reference_mean=REF, **stats_kw):
    """Feed one batch per spec (make_batch kwargs); returns {step: events}."""
    rng = np.random.default_rng(seed)
    out = {}
    for step, spec in enumerate(specs):
        s = stats_of(make_batch(rng, **spec), reference_mean=reference_mean,
                     max_new=spec.get("max_new", MAX_NEW), **stats_kw)
        ev = detector.update(s, step)
        if ev:
            out[step] = ev
    return out


def events_for(events_by_step, condition):
    return [e for evs in events_by_step.values() for e in evs if e.condition == condition]


# ------------------------------------------------------------------ statistics


def test_rollout_stats_hand_computed():
    token_ids = [
        [5, 6, 7, EOS],                    # 4, stopped on EOS
        [1, 2, 1, 2, 1, 2, 1, 2, 1, 2],    # 10, truncated, period-2 loop
        [9, EOS],                          # 2, short (min_length=3)
        [3, 4, 5, 6, 7, 8, 9],             # 7, stopped on a stop string
    ]
    reasons = ["stop", "length", "stop", "stop"]
    s = rollout_stats(token_ids, reasons, {EOS}, max_new_tokens=10,
                      stats=StatsConfig(min_length=3, ngram=3, tail_window=32, repeat_threshold=0.5),
                      reference_mean=5.0)
    assert s.n == 4
    assert s.mean == pytest.approx(5.75)
    assert s.median == pytest.approx(5.5)
    # numpy's linear percentile on sorted [2, 4, 7, 10]: rank 0.95 * 3 = 2.85 -> 7 + 0.85 * 3
    assert s.p95 == pytest.approx(9.55)
    assert (s.min, s.max) == (2, 10)
    assert s.truncated_frac == pytest.approx(0.25)
    assert s.eos_frac == pytest.approx(0.5)
    assert s.short_frac == pytest.approx(0.25)
    assert s.repetition_frac == pytest.approx(0.25)  # only the loop
    # trigrams: 2 + 8 + 0 + 5 = 15; repeats: the loop has 8 trigrams, 2 distinct -> 6
    assert s.repeated_ngram_rate == pytest.approx(6 / 15)
    assert s.length_ratio == pytest.approx(1.15)
    assert s.max_new_tokens == 10
    m = s.as_metrics()
    assert m["length/mean"] == pytest.approx(5.75) and m["length/length_ratio"] == pytest.approx(1.15)
    assert all(isinstance(v, float) for v in m.values())
    assert "length/length_ratio" not in rollout_stats(token_ids, reasons, {EOS}, 10).as_metrics()
    assert rollout_stats(token_ids, reasons, {EOS}, 10).length_ratio is None


def test_repetition_flag_looks_at_the_tail_only():
    rng = np.random.default_rng(1)
    varied = rng.integers(1, VOCAB, 100).tolist()
    loop_at_end = varied + [3, 4] * 20 + [EOS]
    loop_then_varied = [3, 4] * 20 + varied
    assert repetitive_flags([loop_at_end, loop_then_varied, varied]) == [True, False, False]
    # tail [1,2,1,2,1,2]: 4 trigrams, 2 distinct -> 2/4
    assert tail_repeat_fraction([1, 2, 1, 2, 1, 2], ngram=3, tail_window=32) == pytest.approx(0.5)
    assert tail_repeat_fraction([1, 1, 1, 1, 1], ngram=3) == 0.0  # shorter than 2 * ngram
    # 3-token loop in an 8-token tail: trigrams 6, distinct 3
    assert tail_repeat_fraction([9] * 10 + [1, 2, 3] * 4, ngram=3, tail_window=8) == pytest.approx(0.5)


def test_rollout_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        rollout_stats([], [], {EOS}, 10)
    with pytest.raises(ValueError, match="finish_reasons"):
        rollout_stats([[1, 2]], ["stop", "stop"], {EOS}, 10)
    with pytest.raises(ValueError, match="finish_reasons must be"):
        rollout_stats([[1, 2]], ["truncated"], {EOS}, 10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rollout_stats([[1] * 11], ["length"], {EOS}, 10)


def test_reference_lengths_from_tokens_or_lengths():
    a = reference_lengths([[1] * 10, [1] * 20, [1] * 30, [1] * 40])
    b = reference_lengths([10, 20, 30, 40])
    assert a == b == ReferenceLengths(mean=25.0, p95=pytest.approx(38.5))
    with pytest.raises(ValueError):
        reference_lengths([])


# ------------------------------------------------------------------ detector


def test_growing_lengths_turn_inflation_on_with_step_and_reason():
    # mean length grows 5% of the reference per step: ratio crosses 1.5 at step 10
    specs = [dict(mean_len=REF * (1 + 0.05 * t)) for t in range(30)]
    det = LengthDetector()
    ev = events_for(run(det, specs), "inflation")
    assert ev, "inflation never detected"
    first = ev[0]
    assert first.state == "on" and 10 <= first.step <= 13
    assert "length_ratio" in first.reason and "> 1.5" in first.reason
    assert "inflation" in det.active()
    assert first.as_dict() == {"step": first.step, "condition": "inflation", "state": "on",
                               "reason": first.reason}


def test_sudden_truncation_turns_on_after_k_on_steps_not_before():
    specs = [{}] * 10 + [dict(trunc=0.6)] * 5
    det = LengthDetector(DetectorConfig(k_on=2))
    ev = run(det, specs)
    infl = events_for(ev, "inflation")
    assert [(e.step, e.state) for e in infl] == [(11, "on")]
    assert "truncated_frac=0.6 > 0.2" in infl[0].reason
    # k_on=3: one step later
    assert [e.step for e in events_for(run(LengthDetector(DetectorConfig(k_on=3)), specs),
                                       "inflation")] == [12]


def test_single_spike_triggers_nothing():
    specs = [{}] * 10 + [dict(trunc=0.6, rep=0.3)] + [{}] * 10
    det = LengthDetector()
    assert run(det, specs) == {}
    assert det.active() == frozenset()


def test_repetition_loops_turn_repetition_on():
    det = LengthDetector()
    ev = run(det, [{}] * 5 + [dict(rep=0.5)] * 4)
    rep = events_for(ev, "repetition")
    assert [(e.step, e.state) for e in rep] == [(6, "on")]
    assert "repetition_frac=0.5 > 0.2" in rep[0].reason
    assert det.active() == {"repetition"}


def test_short_collapse_by_ratio_and_by_short_frac():
    det = LengthDetector()
    ev = run(det, [{}] * 5 + [dict(mean_len=REF * 0.3, sd=3)] * 3)
    short = events_for(ev, "short_collapse")
    assert [(e.step, e.state) for e in short] == [(6, "on")]
    assert "length_ratio" in short[0].reason
    # without a reference: too many rollouts under min_length
    det = LengthDetector()
    ev = run(det, [{}] * 5 + [dict(mean_len=2, sd=0.5)] * 3, reference_mean=None, min_length=5)
    short = events_for(ev, "short_collapse")
    assert [(e.step, e.state) for e in short] == [(6, "on")]
    assert "short_frac=1 > 0.3" in short[0].reason


def test_eos_collapse_turns_on():
    det = LengthDetector()
    ev = run(det, [{}] * 5 + [dict(no_eos=0.8)] * 3)
    assert [(e.step, e.condition, e.state) for evs in ev.values() for e in evs] == \
        [(6, "eos_collapse", "on")]
    assert "eos_frac=0.2 < 0.5" in ev[6][0].reason


def test_recovery_with_hysteresis():
    # on at step 1; 0.15 (between off 0.1 and on 0.2) holds it on; an interrupted clear
    # streak does not count; two clear steps in a row switch it off; the band then holds off.
    # (cap 128 so that 15% truncated rollouts keep the length ratio under 1.5 too)
    trunc = [0.6, 0.6] + [0.15] * 5 + [0.0, 0.15, 0.0, 0.0] + [0.15] * 5
    det = LengthDetector()
    infl = events_for(run(det, [dict(trunc=t, max_new=128) for t in trunc]), "inflation")
    assert [(e.step, e.state) for e in infl] == [(1, "on"), (10, "off")]
    assert "truncated_frac=0 < 0.1" in infl[1].reason and "length_ratio" in infl[1].reason
    assert det.active() == frozenset()
    # k_off=3 needs one more clear step
    det = LengthDetector(DetectorConfig(k_off=3))
    infl = events_for(run(det, [dict(trunc=t, max_new=128) for t in trunc[:11] + [0.0, 0.0]]),
                      "inflation")
    assert [(e.step, e.state) for e in infl] == [(1, "on"), (11, "off")]


def test_noisy_healthy_stream_never_triggers():
    rng = np.random.default_rng(123)
    det = LengthDetector()
    for step in range(200):
        # per-rollout noise plus batch-level drift of the mean; rare truncation/loops/stop strings
        spec = dict(n=32, mean_len=REF + rng.normal(0, 5), sd=20,
                    trunc=rng.binomial(32, 0.03) / 32, rep=rng.binomial(32, 0.02) / 32,
                    no_eos=rng.binomial(32, 0.05) / 32)
        s = stats_of(make_batch(rng, **spec))
        assert det.update(s, step) == [], f"false alarm at step {step}: {s}"
    assert det.ema["mean_length"] == pytest.approx(REF, rel=0.15)


def test_ema_baselines():
    det = LengthDetector(DetectorConfig(ema_decay=0.5))
    base = dict(n=1, median=0.0, p95=0.0, min=0, max=0, short_frac=0.0, repetition_frac=0.0,
                repeated_ngram_rate=0.0, length_ratio=None, max_new_tokens=100)
    from opd.length import LengthStats
    det.update(LengthStats(mean=10.0, truncated_frac=0.0, eos_frac=1.0, **base), 0)
    det.update(LengthStats(mean=20.0, truncated_frac=1.0, eos_frac=0.0, **base), 1)
    assert det.ema == pytest.approx({"mean_length": 15.0, "truncated_frac": 0.5, "eos_frac": 0.5})
    assert det.metrics()["length/ema/mean_length"] == pytest.approx(15.0)


def test_detector_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(7)
    specs = ([{}] * 3 + [dict(trunc=0.6)] * 3 + [dict(rep=0.5)] * 2 + [dict(trunc=0.6)]
             + [{}] * 6 + [dict(rep=0.5)] * 2)
    stats = [stats_of(make_batch(rng, **spec)) for spec in specs]
    cut = 9  # one inflation hit is pending, repetition is on, eos_collapse is clearing
    det = LengthDetector()
    for step in range(cut):
        det.update(stats[step], step)
    saved = json.loads(json.dumps(det.state_dict()))
    resumed, fresh = LengthDetector(), LengthDetector()
    resumed.load_state_dict(saved)
    a = [det.update(stats[s], s) for s in range(cut, len(stats))]
    b = [resumed.update(stats[s], s) for s in range(cut, len(stats))]
    c = [fresh.update(stats[s], s) for s in range(cut, len(stats))]
    assert a == b and det.state_dict() == resumed.state_dict()
    assert any(a) and a != c  # the restored state mattered


def test_detector_config_validation():
    with pytest.raises(ValueError, match="trunc_off"):
        LengthDetector(DetectorConfig(trunc_off=0.3))
    with pytest.raises(ValueError, match="eos_off"):
        LengthDetector(DetectorConfig(eos_off=0.4))
    with pytest.raises(ValueError, match="k_on"):
        LengthDetector(DetectorConfig(k_on=0))


# ------------------------------------------------------------------ penalties


def test_overlong_penalty_dapo():
    out = overlong_penalty([70, 80, 90, 100, 120], max_new_tokens=100, buffer=20)
    np.testing.assert_allclose(out, [0, 0, -0.5, -1, -1])
    np.testing.assert_allclose(overlong_penalty([99, 100], 100, 1), [0, -1])
    for bad in (0, 101):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty([1], 100, bad)


def test_stop_properly_weights_both_modes():
    reasons = ["stop", "length", "stop", "length"]
    np.testing.assert_array_equal(stop_properly_weights(reasons, "mask"), [1, 0, 1, 0])
    np.testing.assert_allclose(stop_properly_weights(reasons, "downweight", 0.25),
                               [1, 0.25, 1, 0.25])
    with pytest.raises(ValueError):
        stop_properly_weights(reasons, "drop")


def test_length_ratio_penalty_both_directions():
    out = length_ratio_penalty([100, 125, 150, 80, 50, 0], reference_mean=100, coef=2.0,
                               tolerance=0.25)
    np.testing.assert_allclose(out, [0, 0, -0.5, 0, -0.5, -1.5])


def test_rejection_badness():
    reasons = ["length", "length", "stop", "stop"]
    np.testing.assert_array_equal(rejection_badness(reasons, [True, False, True, False]),
                                  [2, 1, 1, 0])


def test_adaptive_max_new_tokens_bounds():
    s_at_cap = stats_of(make_batch(np.random.default_rng(0), trunc=0.6, max_new=1000),
                        max_new=1000)
    assert s_at_cap.p95 == 1000
    assert adaptive_max_new_tokens(1000, s_at_cap, True, 300, 1000) == 900
    cap = 1000
    for _ in range(30):
        cap = adaptive_max_new_tokens(cap, s_at_cap, True, 300, 1000)
        assert cap >= 300
    assert cap == 300
    # batch below the cap: shrink, but not below the batch p95
    s_below = stats_of(make_batch(np.random.default_rng(0), mean_len=900, sd=10, max_new=1000),
                       max_new=1000)
    assert adaptive_max_new_tokens(1000, s_below, True, 300, 1000) == math.ceil(s_below.p95)
    # recovered: grow back, never above the ceiling
    assert adaptive_max_new_tokens(300, s_below, False, 300, 1000) == 330
    for _ in range(30):
        cap = adaptive_max_new_tokens(cap, s_below, False, 300, 1000)
        assert 300 <= cap <= 1000
    assert cap == 1000
    with pytest.raises(ValueError):
        adaptive_max_new_tokens(500, s_below, True, 600, 500)


def test_sequence_penalty_and_loss_weights_follow_the_plan():
    plan = PenaltyPlan(overlong=True, overlong_buffer=20, overlong_max_tokens=100,
                       length_ratio_coef=1.0, length_ratio_tolerance=0.25, reference_mean=50.0,
                       stop_properly="downweight", stop_properly_weight=0.1, max_new_tokens=100)
    lengths, reasons = [70, 90, 100, 60], ["stop", "stop", "length", "length"]
    # overlong: 0, -0.5, -1, -1 (truncated: always -1); ratio: 1.4, 1.8, 2, 1.2 -> -0.15, -0.55, -0.75, 0
    np.testing.assert_allclose(apply_sequence_penalty(plan, lengths, reasons),
                               [-0.15, -1.05, -1.75, -1.0])
    np.testing.assert_allclose(loss_weights(plan, reasons), [1, 1, 0.1, 0.1])
    off = PenaltyPlan.off(100)
    assert not off.any_on
    np.testing.assert_array_equal(apply_sequence_penalty(off, lengths, reasons), 0)
    np.testing.assert_array_equal(loss_weights(off, reasons), 1)


# ------------------------------------------------------------------ LengthMonitor


def inflation_stream(monitor, seed=0, healthy=5, inflated=6, recovered=8):
    """Drive the monitor like the loop does: each batch is generated under the cap the
    previous plan returned. Returns (events, plans)."""
    rng = np.random.default_rng(seed)
    specs = [{}] * healthy + [dict(trunc=0.6)] * inflated + [{}] * recovered
    events, plans, cap = [], [], monitor.max_new_tokens
    for step, spec in enumerate(specs):
        token_ids, reasons = make_batch(rng, max_new=cap, **spec)
        stats, ev, plan = monitor.observe(token_ids, reasons, step)
        assert stats.max_new_tokens == cap
        events += ev
        plans.append(plan)
        cap = plan.max_new_tokens
    return events, plans


def monitor(mode="auto", **penalties):
    """A monitor under MAX_NEW with a reference and the adaptive cap on, with the switching
    rule (the controller's own tests: tests/test_length_control.py)."""
    ref = reference_lengths(np.random.default_rng(0).normal(REF, 10, 500).round().astype(int))
    cfg = LengthConfig(mode=mode, control="switch", penalties=PenaltyConfig(adaptive_max_new_tokens=True, **penalties))
    return LengthMonitor({EOS}, MAX_NEW, cfg, reference=ref)


@pytest.mark.parametrize("mode", ["off", "monitor"])
def test_monitor_off_and_monitor_modes_never_change_penalties(mode):
    mon = monitor(mode)
    events, plans = inflation_stream(mon)
    assert all(p == PenaltyPlan.off(MAX_NEW) for p in plans)
    if mode == "off":
        assert events == []
    else:
        assert [(e.condition, e.state) for e in events if e.condition == "inflation"] == \
            [("inflation", "on"), ("inflation", "off")]


def test_monitor_auto_inflation_on_then_off():
    mon = monitor()
    events, plans = inflation_stream(mon)
    infl = [e for e in events if e.condition == "inflation"]
    on_step, off_step = infl[0].step, infl[1].step
    assert (on_step, infl[1].state) == (6, "off") and off_step > 11
    assert all(not p.any_on for p in plans[:on_step])
    during = plans[on_step:11]
    assert all(p.overlong and p.stop_properly == "mask" for p in during)
    assert all(p.overlong_buffer == min(mon.buffer, p.overlong_max_tokens) for p in during)
    caps = [p.max_new_tokens for p in plans]
    assert caps[:on_step] == [MAX_NEW] * on_step
    assert caps[on_step] < MAX_NEW and min(caps) >= mon.floor_tokens
    assert all(not p.overlong and p.stop_properly is None for p in plans[off_step:])
    assert caps[off_step:] == sorted(caps[off_step:]) and caps[-1] == MAX_NEW  # grew back
    assert all(not p.prefer_bad_rejected and p.length_ratio_coef == 0 for p in plans)


def test_monitor_auto_other_conditions():
    rng = np.random.default_rng(3)
    cases = {"repetition": dict(rep=0.6), "short_collapse": dict(mean_len=10, sd=2),
             "eos_collapse": dict(no_eos=0.8)}
    for cond, spec in cases.items():
        mon = monitor(stop_properly_mode="downweight")
        for step in range(3):
            _, _, plan = mon.observe(*make_batch(rng, **spec), step)
        assert mon.detector.active() == {cond}
        if cond == "repetition":
            assert plan.prefer_bad_rejected and plan.stop_properly == "downweight"
            assert not plan.overlong and plan.length_ratio_coef == 0
        elif cond == "short_collapse":
            assert plan.length_ratio_coef == 1.0 and plan.reference_mean == pytest.approx(REF, rel=0.05)
            assert not plan.overlong and plan.stop_properly is None
        else:
            assert plan.overlong and plan.stop_properly == "downweight"
            assert not plan.prefer_bad_rejected
        assert plan.max_new_tokens == MAX_NEW  # no inflation: the cap stays


def test_monitor_state_dict_round_trip():
    mon = monitor()
    rng = np.random.default_rng(5)
    for step in range(4):
        mon.observe(*make_batch(rng, trunc=0.6, max_new=mon.max_new_tokens), step)
    batches = [make_batch(rng) for _ in range(8)]  # healthy: they fit under any cap >= floor
    assert mon.max_new_tokens < MAX_NEW
    resumed = monitor()
    resumed.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert resumed.max_new_tokens == mon.max_new_tokens
    results = [mon.observe(*b, step) for step, b in enumerate(batches, start=4)]
    assert results == [resumed.observe(*b, step) for step, b in enumerate(batches, start=4)]
    assert any(events for _, events, _ in results)  # eos_collapse / inflation switch off


def test_config_validation():
    with pytest.raises(ValueError, match="penalties.stop_properly_mode"):
        LengthMonitor({EOS}, 100, LengthConfig(penalties=PenaltyConfig(stop_properly_mode="drop")))
    with pytest.raises(ValueError, match="mode"):
        LengthMonitor({EOS}, 100, LengthConfig(mode="on"))
    with pytest.raises(ValueError, match="stats.tail_window"):
        LengthMonitor({EOS}, 100, LengthConfig(stats=StatsConfig(ngram=20)))
    assert PenaltyConfig(overlong_buffer=None).buffer(100) == 20
    # without reference lengths (no floor) the adaptive cap stays where it is
    cfg = LengthConfig(penalties=PenaltyConfig(adaptive_max_new_tokens=True), detector=DetectorConfig(k_on=1))
    mon = LengthMonitor({EOS}, 100, cfg)
    for step in range(3):
        mon.observe([[1] * 100] * 4, ["length"] * 4, step)
    assert "inflation" in mon.detector.active() and mon.max_new_tokens == 100
    assert set(CONDITIONS) == {"inflation", "short_collapse", "repetition", "eos_collapse"}
    assert LengthEvent(1, "inflation", "on", "x").as_dict() == {
        "step": 1, "condition": "inflation", "state": "on", "reason": "x"}


def test_every_detector_and_adaptive_knob_is_settable_from_yaml():
    from opd import length as L
    from opd.config import load_config
    from opd.loop import make_monitor

    cfg = load_config(["length.detector.short_ratio_on=0.4", "length.detector.short_ratio_off=0.6",
                       "length.penalties.adaptive_shrink=0.8", "length.penalties.adaptive_grow=1.3",
                       "length.remedies.anchor_coef=0.2", "length.detector.k_off=5", "length.stats.ngram=4"])
    m = make_monitor(cfg, 2, L.reference_lengths([4, 5, 6]))
    assert m.config is cfg.length and m.detector.config is cfg.length.detector  # passed, not copied
    assert (m.detector.config.short_ratio_on, m.detector.config.k_off) == (0.4, 5)
    p, r = m.config.penalties, m.config.remedies
    assert (p.adaptive_shrink, p.adaptive_grow, r.anchor_coef, m.config.stats.ngram) == (0.8, 1.3, 0.2, 4)
    with pytest.raises(Exception, match="length.detector.short_ratio_on must be <= length.detector.short_ratio_off"):
        load_config(["length.detector.short_ratio_on=0.9"])
