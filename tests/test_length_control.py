"""The length controller (opd/length/controller.py) against a simulated plant, in both
directions, with its anti-windup, its greedy probe and its state across a resume; the
switching rule on the same plant for comparison."""

import json

import numpy as np
import pytest

from opd import length as L

CAP, STOP_LEN, N, EOS = 40, 10, 40, 2


def batch(trunc: float, stop_len: int = STOP_LEN, cap: int = CAP):
    """N rollouts: round(trunc * N) cut at `cap`, the rest `stop_len` tokens ending in EOS."""
    k = int(round(trunc * N))
    ids = [[5] * cap] * k + [list(range(10, 10 + stop_len - 1)) + [EOS]] * (N - k)
    return ids, ["length"] * k + ["stop"] * (N - k)


def reference(trunc: float) -> L.ReferenceLengths:
    """A teacher that truncates `trunc` of its completions and stops the rest at STOP_LEN."""
    return L.ReferenceLengths(mean=trunc * CAP + (1 - trunc) * STOP_LEN, p95=CAP, truncated_frac=trunc,
                              eos_frac=1 - trunc)


def make_monitor(control: str, t_ref: float = 0.1, **cfg) -> L.LengthMonitor:
    return L.LengthMonitor({EOS}, CAP, L.LengthConfig(control=control, **cfg), reference=reference(t_ref))


def strength(plan: L.PenaltyPlan, cfg: L.LengthConfig) -> float:
    """The stop-teaching strength a plan applies, read from its top-k KL coefficient."""
    return plan.topk_kl_coef / cfg.remedies.topk_kl_coef


def simulate(monitor: L.LengthMonitor, steps: int = 120, drift: float = 0.04, gain: float = 0.12,
             delay: int = 3, start: float = 0.9, top: float = 1.2) -> np.ndarray:
    """A plant with lag: the student's truncation x (in [-0.2, top], every rollout cut above 1)
    drifts up by `drift` a step and falls by `gain` times the stop strength applied `delay`
    steps before. -> truncation per step."""
    x, applied, out = start, [0.0] * delay, []
    for step in range(steps):
        t = min(1.0, max(0.0, x))
        out.append(t)
        _, _, plan = monitor.observe(*batch(t), step)
        applied.append(strength(plan, monitor.config))
        x = min(top, max(-0.2, x + drift - gain * applied[-1 - delay]))
    return np.array(out)


def test_pi_settles_in_the_dead_band_where_switching_oscillates():
    pi, switch = make_monitor("pi"), make_monitor("switch")
    t_pi, t_switch = simulate(pi)[-20:], simulate(switch)[-20:]
    band = pi.config.controller.dead_band
    assert t_switch.std() > band and t_switch.max() - t_switch.min() > 2 * band  # a limit cycle
    assert t_pi.std() < band / 2 and t_pi.std() < t_switch.std() / 4  # settled
    assert abs(t_pi.mean() - 0.1) <= band + 0.01  # at the teacher's rate, within the dead band
    assert pi.metrics()["length/ctrl/integral"] > 0  # the integral holds the strength it needs


def test_the_way_down_from_the_cap_builds_no_integral_that_undershoots():
    """A student that starts far past the cap answers the remedies 3 steps late: integrating
    its large errors on the way down would hold the stop strength up after it has learnt to
    stop, and cut it short of the teacher's rate; the clipped error lets it land there."""
    def run(limit: float) -> np.ndarray:
        mon = make_monitor("pi", controller=L.ControllerConfig(integrated_error_limit=limit))
        return simulate(mon, start=1.8, top=2.0)

    clipped, unclipped = run(L.ControllerConfig().integrated_error_limit), run(10.0)
    band = L.ControllerConfig().dead_band
    assert (unclipped < 0.1 - band).sum() > 20  # well below the teacher's 0.1 for 20+ steps
    assert (clipped < 0.1 - band).sum() == 0
    assert abs(clipped[-20:].mean() - 0.1) <= band and clipped[-20:].std() < band / 2


def test_anti_windup_bounds_the_integral_and_releases_at_once():
    limit = 0.4
    mon = make_monitor("pi", controller=L.ControllerConfig(integral_limit=limit, ki=0.2, kp=1.0))
    integrals = []
    for step in range(60):  # a plant the remedies cannot move: nearly every rollout truncated
        mon.observe(*batch(0.95), step)
        integrals.append(mon.metrics()["length/ctrl/integral"])
    assert max(abs(i) for i in integrals) <= limit
    assert mon.strengths["topk_kl"] == 1.0
    for step in range(60, 80):  # recovered, at the teacher's rate: the strength falls back at once
        mon.observe(*batch(0.1), step)
        if mon.strengths["topk_kl"] <= limit:
            break
    assert step - 60 <= 5


def test_the_integral_is_held_while_every_rollout_is_truncated():
    """A student that loops at first: the cut batches saturate the measurement, and the
    integral waits for the first batch with a stopped rollout."""
    mon = make_monitor("pi")
    for step in range(30):
        mon.observe(*batch(1.0), step)
        assert mon.metrics()["length/ctrl/integral"] == 0.0
        assert mon.strengths["mixture"] == 1.0  # full strength meanwhile
    mon.observe(*batch(0.9), 30)
    assert mon.metrics()["length/ctrl/integral"] > 0


def test_too_short_turns_stop_remedies_down_and_the_length_ratio_and_mixture_up():
    mon = make_monitor("pi", t_ref=0.27)
    for step in range(5):  # too long first: the stop-teaching remedies go up
        mon.observe(*batch(0.9), step)
    up = dict(mon.strengths)
    assert up["topk_kl"] > 0.5 and up["mixture"] > 0.5 and up["length_ratio"] == 0
    for step in range(5, 40):  # then over-stopping: no truncation, half the teacher's length
        _, _, plan = mon.observe(*batch(0.0, stop_len=5), step)
    down, errors = mon.strengths, mon.metrics()
    assert errors["length/ctrl/err_trunc"] < 0 and errors["length/ctrl/err_len"] < 0
    assert all(down[k] == 0 for k in ("topk_kl", "overlong", "stop_properly", "anchor"))
    assert down["length_ratio"] > 0 and plan.length_ratio_coef == pytest.approx(down["length_ratio"])
    assert plan.topk_kl_coef == 0 and plan.stop_properly is None
    # the teacher's own completions teach its lengths: the mixture follows either direction
    assert down["mixture"] == down["length_ratio"]
    assert plan.mixture_fraction == pytest.approx(down["length_ratio"] * mon.config.remedies.mixture_fraction)
    # the ratio penalty pulls short rollouts up toward the teacher's mean
    assert L.apply_sequence_penalty(plan, [5] * 4, ["stop"] * 4).max() < 0


def test_strengths_scale_every_remedy_continuously():
    cfg = L.LengthConfig(control="pi", penalties=L.PenaltyConfig(adaptive_max_new_tokens=True, overlong_buffer=4))
    mon = L.LengthMonitor({EOS}, CAP, cfg, reference=L.ReferenceLengths(13.0, 20.0, 0.1, 0.9))  # p95: the cap's floor
    mon.observe(*batch(0.3), 0)  # a little too long: part strength
    s, cfg = mon.strengths["topk_kl"], mon.config
    assert 0 < s < 1 and mon.strengths["mixture"] == s
    _, _, plan = mon.observe(*batch(0.3, cap=mon.max_new_tokens), 1)
    s = mon.strengths["topk_kl"]
    assert plan.mixture_fraction == pytest.approx(s * cfg.remedies.mixture_fraction)
    assert plan.overlong and plan.overlong_coef == pytest.approx(s)
    assert plan.stop_properly == "downweight" and plan.stop_properly_weight == pytest.approx(1 - s)
    assert plan.max_new_tokens == CAP - round(s * (CAP - 20))  # from the ceiling toward the reference p95
    metrics = mon.metrics()
    for name in L.ACTUATORS:
        assert f"length/strength/{name}" in metrics
    for key in ("err_trunc", "err_eos", "err_rep", "err_len", "err_total", "integral", "output"):
        assert f"length/ctrl/{key}" in metrics


def test_stop_properly_at_interpolates_to_the_configured_mode():
    assert L.stop_properly_at("mask", 0.1, 0.0) == (None, 0.1)
    assert L.stop_properly_at("mask", 0.1, 1.0) == ("mask", 0.1)
    assert L.stop_properly_at("mask", 0.1, 0.25) == ("downweight", 0.75)
    assert L.stop_properly_at("downweight", 0.2, 0.5) == ("downweight", pytest.approx(0.6))
    assert L.stop_properly_at(None, 0.1, 1.0) == (None, 0.1)


class LoopingEngine:
    """A fake student engine for the probe: greedy completions loop to the cap."""

    def generate(self, prompts, sampling):
        from opd.types import RolloutBatch

        n = len(prompts.prompt_ids)
        comp = [3, 4] * (sampling.max_new_tokens // 2)
        assert sampling.temperature == 0  # the probe decodes greedily
        return RolloutBatch([list(p) for p in prompts.prompt_ids], [list(comp)] * n, [[0.0] * len(comp)] * n,
                            ["length"] * n, ["x"] * n, 0, 0.01)


def test_the_greedy_probes_loop_flag_reaches_the_controller():
    from types import SimpleNamespace

    from opd.config import load_config
    from opd.evaluation import Evaluator
    from opd.types import PromptBatch

    cfg = load_config([f"rollout.max_new_tokens={CAP}", "length.probe_every=1", "length.probe_prompts=2"])
    heldout = PromptBatch([[7, 8], [9], [10]], ["1", "2", "3"], ["a", "b", "c"], [None] * 3)
    ev = Evaluator(cfg, LoopingEngine(), SimpleNamespace(eos_token_id=EOS, pad_token_id=0), heldout)
    greedy = ev.probe(cfg.length.probe_prompts, CAP)
    assert greedy.n == 2 and greedy.repetition_frac == 1.0 and greedy.truncated_frac == 1.0
    mon, healthy = make_monitor("pi"), make_monitor("pi")
    mon.observe_probe(greedy)
    for step in range(3):  # sampled rollouts at the teacher's rate: no error of their own
        mon.observe(*batch(0.1), step)
        healthy.observe(*batch(0.1), step)
    gain = mon.config.controller.probe_gain
    assert healthy.strengths["topk_kl"] == 0 and healthy.strengths["anchor"] == 0
    assert mon.strengths["topk_kl"] == gain and mon.strengths["anchor"] == gain  # the probe's floor
    m = mon.metrics()
    assert (m["length/probe/repetitive"], m["length/probe/truncated"], m["length/probe/mean_len"]) == (1.0, 1.0, CAP)
    # the probes are smoothed: one clean probe after a looping one halves the floor (EMA 0.5), it does not drop it
    mon.observe_probe(L.rollout_stats(*batch(0.0), {EOS}, CAP))
    mon.observe(*batch(0.1), 3)
    decay = mon.config.controller.ema_decay
    assert mon.metrics()["length/probe/truncated"] == pytest.approx(decay)
    assert mon.strengths["topk_kl"] == pytest.approx(gain * decay)


def test_the_probe_is_compared_with_the_teachers_greedy_rates():
    """A teacher that truncates 40% of its samples but none of its greedy completions: a
    student whose greedy completions are cut 30% of the time is over the teacher's greedy
    rate, which the sampled rate alone would hide."""
    def stats(trunc: float) -> L.LengthStats:  # the rollouts of batch(), the cut ones without a loop
        ids, reasons = batch(trunc)
        ids = [list(range(100, 100 + CAP)) if r == "length" else x for x, r in zip(ids, reasons)]
        return L.rollout_stats(ids, reasons, {EOS}, CAP)

    probe = stats(0.3)
    assert (probe.truncated_frac, probe.repetition_frac) == (0.3, 0.0)
    sampled = reference(0.4)
    with_greedy = sampled.with_greedy(reference(0.0))
    assert with_greedy.greedy_rates() == (0.0, 0.0) and sampled.greedy_rates() == (0.4, 0.0)
    drives = {}
    for name, ref in (("sampled only", sampled), ("with greedy", with_greedy)):
        ctl = L.LengthController(reference=ref)
        ctl.observe_probe(probe)
        drives[name] = ctl.update(stats(0.4))  # the sampled rollouts at the teacher's rates
    assert drives["sampled only"]["stop"] == 0
    assert drives["with greedy"]["stop"] == pytest.approx(ctl.config.probe_gain * 0.3)  # gain x the greedy excess


def test_reference_with_greedy_rates_survives_a_checkpoint():
    import dataclasses

    ref = reference(0.27).with_greedy(reference(0.125))
    assert L.ReferenceLengths(*json.loads(json.dumps(dataclasses.astuple(ref)))) == ref
    assert L.ReferenceLengths(*dataclasses.astuple(reference(0.27))[:5]).greedy_rates() == (0.27, 0.0)


def test_controller_state_survives_a_resume_exactly():
    a = make_monitor("pi")
    for step in range(6):
        a.observe(*batch(0.8), step)
    a.observe_probe(L.rollout_stats(*batch(0.5), {EOS}, CAP))
    b = make_monitor("pi")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    rng = np.random.default_rng(0)
    later = [batch(float(t)) for t in rng.uniform(0, 1, 10)]
    assert [a.observe(*x, s) for s, x in enumerate(later, 6)] == [b.observe(*x, s) for s, x in enumerate(later, 6)]
    assert a.metrics() == b.metrics()


def test_reference_carries_the_teachers_rates():
    ids = [[1, 2, 3, EOS], [4] * 8, [3, 4] * 4, [5, EOS]]
    ref = L.reference_lengths(ids, ["stop", "length", "length", "stop"], {EOS}, L.StatsConfig(tail_window=8))
    assert (ref.truncated_frac, ref.eos_frac, ref.repetition_frac) == (0.5, 0.5, 0.5)
    assert L.reference_lengths([4, 8]) == L.ReferenceLengths(6.0, pytest.approx(7.8), 0.0, 1.0, 0.0)


def test_controller_config_is_checked_and_settable_from_yaml():
    from opd.config import load_config

    cfg = load_config(["length.control=pi", "length.controller.kp=2", "length.controller.dead_band=0.1",
                       "length.probe_every=5"])
    assert (cfg.length.control, cfg.length.controller.kp, cfg.length.probe_every) == ("pi", 2.0, 5)
    assert load_config([]).length.control == "switch"
    with pytest.raises(Exception, match="length.control must be one of"):
        load_config(["length.control=bang"])
    with pytest.raises(Exception, match="length.controller.integral_limit must be in"):
        load_config(["length.controller.integral_limit=2"])
    with pytest.raises(ValueError, match="controller.ema_decay"):
        L.LengthMonitor({EOS}, CAP, L.LengthConfig(controller=L.ControllerConfig(ema_decay=1.0)))


@pytest.mark.slow
def test_toy_run_logs_strengths_errors_and_the_probe(tiny_overrides, tiny_zoo, tmp_path):
    from opd.config import load_config
    from opd.train import run_training

    cfg = load_config(tiny_overrides + [
        f"run_dir={tmp_path}", "resources.use_ray=false", "steps=4", "loss=opd", "eval_every=0",
        "checkpoint_every=0", "log_every=1", "length=auto", "length.control=pi", "length.reference_prompts=8",
        "length.probe_every=2", "length.probe_prompts=4"])
    run_training(cfg)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/rows_total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for name in L.ACTUATORS:
            assert 0.0 <= r[f"length/strength/{name}"] <= 1.0
        for key in ("err_trunc", "err_len", "err_total", "integral", "output"):
            assert f"length/ctrl/{key}" in r
        assert "length/reference/truncated_frac" in r
    assert ["time/probe" in r for r in steps] == [False, True, False, True]
    for r in steps[1:]:
        assert {"length/probe/truncated", "length/probe/repetitive", "length/probe/mean_len"} <= r.keys()
    assert (tmp_path / "length.png").stat().st_size > 5000
