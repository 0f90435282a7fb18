"""`opd-report` on an old-style run directory (metrics.jsonl + summary.json + config.json):
the plots exist, report.md carries the numbers, and every before/after pair is found."""

import json

import pytest

from opd.report import before_after_pairs, main, write_report

SUMMARY = {"teacher": 0.9, "student_before": 0.25, "student_after": 0.625,
           "sampled_before": {"mean": 7.5, "eos_frac": 0.5, "n": 30}, "sampled_after": {"mean": 5.25, "eos_frac": 0.875, "n": 30},
           "eval": {"before": {"gsm_like": 0.125}, "after": {"gsm_like": 0.375}},
           "wall_seconds": 12.0, "environment": {"cpus_before": 2}}


def _fake_run(root):
    root.mkdir()
    lines = []
    for s in range(1, 6):
        events = [{"step": 3, "condition": "truncation", "state": "on", "reason": "ema 0.40 > 0.30"}] if s == 3 else []
        lines.append({"step": s, "teacher/kl": 1.0 / s, "loss/rows_total": 0.5 - 0.05 * s, "length/mean": 4.0 + s,
                      "length/p95": 6.0 + s, "length/truncated_frac": 0.1 * s, "length/eos_frac": 1 - 0.1 * s,
                      "time/generate": 0.5, "time/teacher": 0.25, "time/learn": 1.0, "time/sync": 0.125,
                      "time/other": 0.125, "time/step": 2.0, "events": events})
    lines.append({"step": 5, "eval/exact_match": 0.5, "events": []})
    (root / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (root / "summary.json").write_text(json.dumps(SUMMARY))
    (root / "config.json").write_text(json.dumps({"task": {"name": "addition"}, "steps": 5,
                                                  "student": {"path": None}, "loss": {"distill": "jsd"}}))
    return root


def test_report_on_an_old_run_dir(tmp_path, capsys):
    run = _fake_run(tmp_path / "old-run")
    main([str(run)])
    assert "report.md" in capsys.readouterr().out
    for png in ("training.png", "length.png", "heldout.png"):
        assert (run / png).stat().st_size > 5000, png
    md = (run / "report.md").read_text()
    assert "| answer accuracy, greedy | 0.25 | 0.625 | +0.375 | 0.9 |" in md
    assert "| sampled/mean | 7.5 | 5.25 | -2.25 |  |" in md
    assert "| eval/gsm_like | 0.125 | 0.375 | +0.25 |  |" in md
    assert "| learn | 1.000 | 50% |" in md and "| step | 2.000 |  |" in md
    assert "| `task.name` | addition |" in md and "| `student.path` | zoo model |" in md
    assert "step 3: truncation -> on (ema 0.40 > 0.30)" in md
    assert "teacher KL: first 1, last 0.2" in md
    assert "![heldout](heldout.png)" in md


def test_before_after_pairs_are_generic_and_skip_unpaired_and_counts():
    pairs = {p.label: (p.before, p.after, p.teacher) for p in before_after_pairs(
        {**SUMMARY, "orphan_before": 1.0, "flag_before": True, "flag_after": False})}
    assert pairs == {"answer accuracy, greedy": (0.25, 0.625, 0.9), "sampled/mean": (7.5, 5.25, None),
                     "sampled/eos_frac": (0.5, 0.875, None), "eval/gsm_like": (0.125, 0.375, None)}


def test_report_with_only_metrics(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "teacher/kl": 0.5, "events": []}) + "\n")
    md = write_report(run).read_text()
    assert "(no before/after metrics in summary.json)" in md and "(no config.json)" in md
    assert (run / "training.png").is_file() and not (run / "heldout.png").exists()


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_heldout_views_pair_with_the_teachers_own_value():
    summary = {"eval": {"teacher": {"accuracy/greedy": 0.5, "sampled/eos_frac": 0.75},
                        "before": {"kl": 4.0, "accuracy/greedy": 0.0, "sampled/eos_frac": 0.0},
                        "after": {"kl": 1.5, "accuracy/greedy": 0.25, "sampled/eos_frac": 0.5}}}
    pairs = {p.label: (p.before, p.after, p.teacher) for p in before_after_pairs(summary)}
    assert pairs == {"eval/kl": (4.0, 1.5, 0.0), "eval/accuracy/greedy": (0.0, 0.25, 0.5),
                     "eval/sampled/eos_frac": (0.0, 0.5, 0.75)}


def test_length_png_draws_the_controller_under_the_truncation(tmp_path):
    from opd.report import load_run, plot_length

    run = _fake_run(tmp_path / "run")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows[:-1]:
        r.update({"length/strength/topk_kl": 0.2 * r["step"], "length/strength/length_ratio": 0.0,
                  "length/ctrl/err_total": 0.5 - 0.1 * r["step"], "length/reference/truncated_frac": 0.25,
                  "length/probe/truncated": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_length(load_run(run), run)
    assert png == run / "length.png" and png.stat().st_size > 5000


def test_gap_closed_reports_real_gaps_only():
    from opd.evaluation import gap_closed

    assert gap_closed(0.965, 0.25, 0.9) == pytest.approx((0.9 - 0.25) / (0.965 - 0.25))
    assert gap_closed(3.525, 3.535, 3.500) is None  # a mean length already at the teacher's
    assert gap_closed(1.0, 0.995, 1.0) is None  # one sample in 200
    assert gap_closed(28.5, 48.0, 30.0) == pytest.approx((30.0 - 48.0) / (28.5 - 48.0))
    assert gap_closed(0.9, 0.1, float("nan")) is None
