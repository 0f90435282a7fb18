"""The whole loop on the tiny zoo: in-process (no Ray), resume, every loss mode, and a Ray run
in which the teacher KL falls."""

import json

import numpy as np
import pytest
import torch

from opd.config import load_config
from opd.train import run_training

pytestmark = pytest.mark.slow

FAST = ["length.reference_prompts=8", "eval_every=0", "checkpoint_every=0", "log_every=1"]


def _metrics(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "loss/rows_total" in l or "offpolicy/mean" in l]


def test_inprocess_run_writes_metrics_summary_and_checkpoint(tiny_overrides, tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(tiny_overrides + FAST + [f"run_dir={tmp_path}", "resources.use_ray=false", "steps=3",
                                               "loss=opd"])
    summary = run_training(cfg)
    steps = _metrics(tmp_path)
    assert [m["step"] for m in steps] == [1, 2, 3]
    for key in ("length/mean", "length/p95", "length/max", "length/truncated_frac", "teacher/kl",
                "loss/pg", "optim/grad_norm", "optim/lr", "time/generate", "time/teacher", "time/learn",
                "time/sync", "rollout/tokens_per_s", "rollout/weight_version"):
        assert key in steps[-1], key
    assert [m["rollout/weight_version"] for m in steps] == [0, 1, 2]  # sync after every step
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("student_before", "student_after", "teacher", "wall_seconds", "environment"):
        assert key in on_disk
    assert on_disk["student_after"] == summary["student_after"] == summary["eval"]["after"]["accuracy/greedy"]
    ckpt = tmp_path / "checkpoints" / "step-000003"
    model = AutoModelForCausalLM.from_pretrained(ckpt)  # a Hugging Face model directory
    assert model.config.num_hidden_layers == cfg.student.zoo.layers
    assert not list(ckpt.glob("*.bin"))


def _differing(a: dict, b: dict) -> list[str]:
    """The names whose tensors differ in shape, dtype or any bit (a name on one side only too)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


LORA_ADAPTER = ["student.lora.enabled=true", "student.lora.r=4", "student.lora.alpha=8", "student.lora.sync=adapter"]


@pytest.mark.parametrize("student", [[], LORA_ADAPTER], ids=["full", "lora-adapter"])
def test_resume_continues_exactly(tiny_overrides, tiny_zoo, tmp_path, student):
    """Checkpoint every step, then resume from step 1: after the resumed run's first step and
    after its last, its weights, AdamW moments and LR schedule equal the uninterrupted run's
    bit for bit (a step's loss and gradient norm come before its update, so they alone would
    not show lost optimizer state), under the length controller (its state resumes too). Also
    for a LoRA student whose engines run the base and take the adapter: the resumed run
    rebuilds the base and continues the adapter."""
    from safetensors.torch import load_file

    base = tiny_overrides + FAST + student + ["resources.use_ray=false", "steps=3", "checkpoint_every=1",
                                              "keep_checkpoints=5", "optim.lr=0.003", "length.control=pi"]
    run_training(load_config(base + [f"run_dir={tmp_path / 'a'}"]))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000001"
    run_training(load_config(base + [f"run_dir={tmp_path / 'b'}", f"resume={ckpt}"]))
    full, resumed = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in resumed] == [2, 3]
    # the student's tokenizer file itself (a re-save turns the toy's WordLevel model into BPE)
    assert (ckpt / "tokenizer.json").read_bytes() == (tiny_zoo.student / "tokenizer.json").read_bytes()
    # the checkpoints each step left: the state after the resumed run's first step, and its last
    for step in (2, 3):
        a, b = (tmp_path / run / "checkpoints" / f"step-{step:06d}" for run in ("a", "b"))
        trained = "adapter/adapter_model.safetensors" if student else "model.safetensors"
        for weights in {"model.safetensors", trained}:
            assert _differing(load_file(a / weights), load_file(b / weights)) == [], (step, weights)
        sa, sb = (torch.load(d / "learner_state.pt", weights_only=True) for d in (a, b))
        moments_a, moments_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
        assert moments_a.keys() == moments_b.keys() and len(moments_a) == len(load_file(a / trained))
        for i in moments_a:
            assert {"exp_avg", "exp_avg_sq", "step"} <= moments_a[i].keys()
            assert _differing(moments_a[i], moments_b[i]) == [], (step, i)
        assert float(next(iter(moments_b.values()))["step"]) == step  # AdamW's own count: the restored one, not restarted
        assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
        assert sa["scheduler"] == sb["scheduler"]
    for key in ("rollout/weight_version", "rollout/staleness", "loss/rows_total", "teacher/kl", "length/mean",
                "optim/grad_norm", "optim/lr"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in full[1:]], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("loss", ["gkd", "smpo", "smpo_only", "seqkd"])
def test_every_loss_mode_trains(tiny_overrides, tiny_zoo, tmp_path, loss):
    over = tiny_overrides + FAST + [f"run_dir={tmp_path}", "resources.use_ray=false", "steps=2", f"loss={loss}",
                                    "loss.smpo.min_score_gap=0", "rollout.samples_per_prompt=4"]
    run_training(load_config(over))
    steps = _metrics(tmp_path)
    assert len(steps) == 2
    last = steps[-1]
    assert np.isfinite(last["optim/grad_norm"]) and last["optim/grad_norm"] > 0
    if loss == "gkd":
        assert "loss/jsd" in last
    if loss in ("smpo", "smpo_only"):
        assert any("smpo/pairs" in m and m["smpo/pairs"] > 0 for m in steps)
        assert any("loss/smpo_pref" in m for m in steps)
    if loss == "seqkd":
        assert last["rollout/on_policy"] == 0.0 and "loss/sft" in last


@pytest.mark.parametrize("overlap", [False, True])
def test_ray_run_teacher_kl_falls(tiny_overrides, tiny_zoo, tmp_path, overlap):
    """Also one-step off-policy (rollout.overlap): every step after the first trains on
    rollouts from the weights one step older, and the KL still falls."""
    cfg = load_config(tiny_overrides + FAST + [
        f"run_dir={tmp_path}", "resources.use_ray=true", "steps=24", "optim.lr=0.002",
        "optim.warmup_steps=2", "rollout.prompts_per_step=16", "rollout.samples_per_prompt=4",
        "length=monitor", "resources.rollout_workers=2", f"rollout.overlap={overlap}"])  # two vLLM engines
    run_training(cfg)
    kl = [m["teacher/kl"] for m in _metrics(tmp_path)]
    assert len(kl) == 24
    assert [m["rollout/staleness"] for m in _metrics(tmp_path)] == [0.0] + [float(overlap)] * 23
    # the tiny student (1 layer, hidden 64) plateaus near 2.3 nats from ~3: a clear, not a deep, fall
    assert np.mean(kl[-6:]) < 0.9 * np.mean(kl[:6]), kl


def test_summary_and_opd_eval_report_the_heldout_views(tiny_overrides, tiny_zoo, tmp_path, capsys):
    """summary.json holds the teacher's view and the student's before and after; opd-eval
    prints the same view for any model directory, as a table and as JSON."""
    from opd.evaluate import main as opd_eval

    cfg = load_config(tiny_overrides + FAST + [f"run_dir={tmp_path}", "resources.use_ray=false", "steps=1"])
    summary = run_training(cfg)
    ev = summary["eval"]
    for view in ("before", "after"):
        assert {"kl", "nll_teacher_greedy", "accuracy/greedy", "sampled/eos_frac",
                "greedy/repetition_frac"} <= set(ev[view])
    assert "kl" not in ev["teacher"] and ev["teacher"]["nll_teacher_greedy"] < ev["before"]["nll_teacher_greedy"]
    assert summary["student_before"] == ev["before"]["accuracy/greedy"]  # the headline is the same number
    capsys.readouterr()
    opd_eval(tiny_overrides + [f"student.path={tmp_path / 'checkpoints' / 'step-000001'}"])
    out = capsys.readouterr().out
    assert "KL(student||teacher) per token, sampled" in out
    views = json.loads(out.strip().splitlines()[-1])
    # the same weights, greedy: the same answers (one of 30 prompts may flip on float noise)
    assert views["before"]["accuracy/greedy"] == pytest.approx(ev["after"]["accuracy/greedy"], abs=0.04)


def test_processed_sampling_shows_in_mismatch_metrics_and_configured_view(tiny_overrides, tiny_zoo, tmp_path):
    """Plain T=1 rollouts: the sampler's log-probs are the student's (ratio ~1, nothing past a
    0.2 clip). Top-k 2 with a repetition penalty: the sampled distribution differs, the
    mismatch metrics say so, and the held-out `configured/` view samples with those settings."""
    def run(name, extra):
        cfg = load_config(tiny_overrides + FAST + [f"run_dir={tmp_path / name}", "resources.use_ray=false",
                                                   "steps=1", "loss=gkd"] + extra)
        return run_training(cfg), _metrics(tmp_path / name)[0]

    plain, m_plain = run("plain", [])
    tuned, m_tuned = run("tuned", ["rollout.top_k=2", "rollout.repetition_penalty=1.5"])
    assert abs(m_plain["is/ratio_mean"] - 1) < 0.02 and m_plain["is/clip_frac"] < 0.02
    assert m_tuned["is/clip_frac"] > 0.1 and m_tuned["is/kl_k3"] > 10 * m_plain["is/kl_k3"]
    assert not any(k.startswith("configured/") for k in plain["eval"]["before"])
    assert {"configured/repetition_frac", "configured/truncated_frac", "configured/eos_frac"} <= set(
        tuned["eval"]["after"])
