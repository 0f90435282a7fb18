"""Tests of opd/sweep.py (early signals, Spearman, the early-stop rule on hand-built
histories, the sweep's best finished run) and opd/compare.py (`opd-report --compare` on
hand-built run directories), and of the multirun run-dir rule in opd/train.py."""
import json
import math

import pytest

from opd import sweep as S
from opd.compare import labels, rank, write_compare
from opd.report import main as report_main


def history(grad_norms, losses=None, pair_losses=None):
    losses = losses or [1.0] * len(grad_norms)
    rows = []
    for i, (g, l) in enumerate(zip(grad_norms, losses), start=1):
        row = {"step": i, "optim/grad_norm": g, "loss/rows_total": l, "loss/jsd": l}
        if pair_losses:
            row["loss/pairs_total"] = pair_losses[i - 1]
        rows.append(row)
        rows.append({"step": i, "eval/kl": 9.0})  # an eval line: no gradient norm, ignored
    return rows


def test_early_signals_average_the_first_n_training_steps():
    e = S.early_signals(history([1.0, 3.0, 100.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0]), 2)
    assert e == {"grad_norm": 2.0, "loss": 4.0, "steps": 2.0}  # loss = rows + pairs totals
    assert math.isnan(S.early_signals([], 3)["grad_norm"])


def test_spearman_matches_hand_computed_values():
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties averaged: ranks x = (1.5, 1.5, 3, 4), y = (1, 2, 3, 4) -> Pearson of the ranks
    assert S.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(S.spearman([1, 2], [1, 2]))  # too few
    assert math.isnan(S.spearman([1, 1, 1], [1, 2, 3]))  # constant
    assert S.spearman([1, 2, float("nan"), 3], [1, 2, 5, 3]) == pytest.approx(1.0)  # NaN pair dropped


def test_rule_waits_for_n_steps_then_compares_with_the_threshold():
    rows = history([5.0, 7.0, 1.0])
    assert S.early_stop_decision(rows[:2], 2, "grad_norm", "lower", threshold=1.0) is None
    d = S.early_stop_decision(rows, 2, "grad_norm", "lower", threshold=4.0)
    assert d.stop and d.value == 6.0 and "worse than the threshold 4" in d.reason
    assert not S.early_stop_decision(rows, 2, "grad_norm", "lower", threshold=8.0).stop
    # loss, where higher is better (the SFT finding)
    rows = history([1.0, 1.0], [0.5, 0.7])
    assert S.early_stop_decision(rows, 2, "loss", "higher", threshold=1.0).stop
    assert not S.early_stop_decision(rows, 2, "loss", "higher", threshold=0.5).stop


def test_rule_against_the_best_run_uses_the_tolerance_and_stops_a_diverged_run():
    rows = history([1.05, 1.15])  # mean 1.1
    assert not S.early_stop_decision(rows, 2, "grad_norm", "lower", reference=1.0, tolerance=0.2).stop
    d = S.early_stop_decision(rows, 2, "grad_norm", "lower", reference=1.0, tolerance=0.05,
                              reference_run="runs/a")
    assert d.stop and "runs/a" in d.reason and d.as_dict()["reference"] == 1.0
    assert S.early_stop_decision(history([float("nan"), float("inf")]), 2, "grad_norm", "lower").stop
    with pytest.raises(ValueError, match="signal must be one of"):
        S.early_stop_decision(rows, 2, "accuracy", "lower")


def make_run(root, name, grad_norms, losses, kl, acc, lr, batch, stopped=False, finished=True):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history(grad_norms, losses)))
    (d / "config.json").write_text(json.dumps({"optim": {"lr": lr}, "rollout": {"prompts_per_step": batch},
                                               "run_dir": str(d), "seed": 0}))
    if finished:
        summary = {"eval": {"after": {"kl": kl, "accuracy/greedy": acc}}}
        if stopped:
            summary["early_stop"] = {"stop": True}
        (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def sweep_dir(tmp_path):
    # lower early grad norm -> lower final KL, exactly (rho = +1 for grad_norm vs kl)
    make_run(tmp_path, "0", [1.0, 1.0], [3.0, 3.0], 0.5, 0.9, 1e-4, 64)
    make_run(tmp_path, "1", [2.0, 2.0], [2.0, 2.0], 0.7, 0.8, 3e-4, 64)
    make_run(tmp_path, "2", [3.0, 3.0], [1.0, 1.0], 0.9, 0.5, 1e-3, 16)
    make_run(tmp_path, "3", [0.1, 0.1], [9.0, 9.0], 0.1, 1.0, 1e-3, 64, stopped=True)  # not final
    make_run(tmp_path, "4", [0.1], [1.0], 0.0, 0.0, 1e-5, 8, finished=False)  # still running
    return tmp_path


def test_best_finished_run_skips_stopped_unfinished_and_excluded_runs(sweep_dir):
    best = S.best_finished_run(sweep_dir, "kl", 2)
    assert best.path.endswith("0") and best.early["grad_norm"] == 1.0
    assert S.best_finished_run(sweep_dir, "kl", 2, exclude=sweep_dir / "0").path.endswith("1")
    assert S.best_finished_run(sweep_dir, "accuracy", 2).path.endswith("0")
    assert S.best_finished_run(sweep_dir / "nowhere", "kl", 2) is None


def test_compare_ranks_correlates_and_writes_table_json_and_plot(sweep_dir, capsys):
    report_main(["--compare", *[str(sweep_dir / n) for n in "01234"], "--early-steps", "2"])
    out = json.loads((sweep_dir / "compare.json").read_text())
    assert (sweep_dir / "compare.md").is_file() and (sweep_dir / "compare.png").stat().st_size > 0
    assert [r["run"] for r in out["rows"]][:3] == ["lr=0.001 prompts_per_step=64", "lr=0.0001 prompts_per_step=64",
                                                   "lr=0.0003 prompts_per_step=64"]
    by = {r["path"][-1]: r for r in out["rows"]}
    assert by["0"]["rank_kl"] == 2 and by["3"]["rank_kl"] == 1 and by["3"]["stopped_early"]
    assert by["0"]["rank_early_grad_norm"] == 2 and by["0"]["rank_early_loss"] == 2
    corr = {(c["signal"], c["quality"]): c for c in out["correlations"]}
    assert corr[("grad_norm", "kl")]["spearman"] == pytest.approx(1.0) and corr[("grad_norm", "kl")]["agrees"]
    assert corr[("loss", "kl")]["spearman"] == pytest.approx(-1.0) and corr[("loss", "kl")]["n"] == 3
    assert out["skipped"] == [str(sweep_dir / "4")]
    assert "Spearman" in capsys.readouterr().out


def test_compare_helpers():
    assert rank([0.3, float("nan"), 0.1], "lower") == [2, None, 1]
    assert rank([0.3, 0.1], "higher") == [1, 2]
    cfgs = [{"optim": {"lr": 1}, "seed": 0, "run_dir": "a"}, {"optim": {"lr": 2}, "seed": 0, "run_dir": "b"}]
    assert labels(cfgs, ["a", "b"]) == ["lr=1", "lr=2"]
    assert labels([{"seed": 0}, {"seed": 0}], ["a", "b"]) == ["a", "b"]


def test_compare_refuses_when_no_run_finished(tmp_path):
    make_run(tmp_path, "x", [1.0], [1.0], 0, 0, 1e-3, 8, finished=False)
    with pytest.raises(FileNotFoundError, match="no finished run"):
        write_compare([tmp_path / "x"], tmp_path, 1)


def test_multirun_jobs_get_their_own_run_dir(monkeypatch):
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from opd.train import multirun_dir

    node = OmegaConf.create({"run_dir": "runs/addition-20261122-060000"})
    for mode, want in ((RunMode.MULTIRUN, "/tmp/sweep/1-optim.lr=0.003"),
                       (RunMode.RUN, "runs/addition-20261122-060000")):
        hc = SimpleNamespace(mode=mode, runtime=SimpleNamespace(output_dir="/tmp/sweep/1-optim.lr=0.003"))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda hc=hc: hc))
        node.run_dir = "runs/addition-20261122-060000"
        multirun_dir(node)
        assert node.run_dir == want


def test_loop_stops_at_after_steps_against_the_sweep_and_records_the_verdict(sweep_dir):
    from types import SimpleNamespace

    from opd.record import RunRecord
    from opd.run_io import RunDir

    me = make_run(sweep_dir, "me", [5.0, 5.0], [1.0, 1.0], 0, 0, 1e-2, 8, finished=False)
    es = SimpleNamespace(enabled=True, after_steps=2, signal="grad_norm", better="lower", threshold=None,
                         sweep_dir="auto", tolerance=0.1, quality="kl")
    record = RunRecord(SimpleNamespace(early_stop=es), RunDir(me))
    notes = []
    record.console = SimpleNamespace(note=notes.append)
    assert not record.early_stop(1) and record.summary.early_stop is None  # not yet
    assert record.early_stop(2)  # 5.0 vs 1.0 of run 0, the best finished run by KL
    v = record.summary.early_stop
    assert v["stop"] and v["reference"] == 1.0 and v["reference_run"].endswith("/0")
    assert notes[-1].startswith("EARLY STOP at step 2:")
    es.enabled = False
    assert not record.early_stop(2)
