"""opd-check (opd/check/): each row on a pair built to fail it, the self-distillation smoke
test for every loss.distill, the length forecast on the real pair, and the exit codes."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from opd.check import cheap_rows, sampled_rows
from opd.check.report import Row, Verdict
from opd.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _student_copy(tiny_zoo, tmp_path, edit) -> Path:
    """The tiny student, its tokenizer files changed by `edit(dir)`."""
    dst = tmp_path / "student"
    shutil.copytree(tiny_zoo.student, dst)
    edit(dst)
    return dst


def _set_eos(d: Path, token: str) -> None:
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "eos_token": token}))


def _row(rows, name) -> Row:
    return next(r for r in rows if r.name == name)


def test_student_eos_other_than_teachers_fails_row_1(tiny_cfg, tiny_zoo, tmp_path):
    student = _student_copy(tiny_zoo, tmp_path, lambda d: _set_eos(d, "<unk>"))
    row = _row(cheap_rows(tiny_cfg, str(student), {"teacher": str(tiny_zoo.teacher)}), "tokenizers")
    assert row.verdict is Verdict.FAIL
    text = "\n".join(row.found)
    assert "eos '<unk>' vs '<eos>'" in text, text


def test_chat_template_changed_in_one_model_fails_row_1_at_its_first_difference(tiny_cfg, tiny_zoo, tmp_path):
    def edit(d):
        p = d / "chat_template.jinja"
        p.write_text(p.read_text().replace("'<|assistant|>'", "'<|assistant|> '"))

    student = _student_copy(tiny_zoo, tmp_path, edit)
    row = _row(cheap_rows(tiny_cfg, str(student), {"teacher": str(tiny_zoo.teacher)}), "tokenizers")
    assert row.verdict is Verdict.FAIL
    where = next(f for f in row.found if "render" in f)
    assert "at character" in where, row.found
    cheap = {r.name: r.verdict for r in cheap_rows(tiny_cfg, str(tiny_zoo.student), {"teacher": str(tiny_zoo.teacher)})}
    assert cheap == {"tokenizers": Verdict.OK, "memory": Verdict.OK, "data": Verdict.OK}


def test_memory_forecast_counts_lora_s_trained_params_and_shards_per_rank(tiny_overrides, tiny_zoo):
    from opd.check.memory import GIB, Devices, ParamCounts, forecast, memory_row, param_counts

    full = load_config(tiny_overrides + ["length=monitor"])
    lora = load_config(tiny_overrides + ["length=monitor", "student.lora.enabled=true", "student.lora.r=4"])
    whole, adapters = (param_counts(str(tiny_zoo.student), False, c.student.lora) for c in (full, lora))
    assert adapters.trainable < adapters.total and whole.trainable == whole.total
    teacher = {"teacher": ParamCounts(1000, 1000)}
    f1, f2 = (forecast(c, p, teacher, on_gpu=False) for c, p in ((full, whole), (lora, adapters)))
    assert f1.learner_rank == 20 * whole.total and f2.learner_rank == 4 * adapters.total + 16 * adapters.trainable
    two = replace(full, resources=replace(full.resources, learner_workers=2, use_ray=True))
    assert forecast(two, whole, teacher, on_gpu=False).learner_rank == -(-20 * whole.total // 2)
    roomy, cramped = Devices(64 * GIB, 60 * GIB), Devices(GIB // 8, GIB // 8)
    assert memory_row(full, f1, roomy).verdict is Verdict.OK
    assert memory_row(full, f1, cramped).verdict is Verdict.FAIL  # the KV cache alone is 0.25 GiB
    on_gpu = replace(full, resources=replace(full.resources, learner_num_gpus=1))
    big = replace(f1, learner_rank=2 * GIB)
    row = memory_row(on_gpu, big, Devices(64 * GIB, 60 * GIB, gpu=(GIB,)))
    assert row.verdict is Verdict.FAIL and "resources.learner_workers" in " ".join(row.todo)


def test_several_teachers_get_a_tokenizer_row_each_and_one_memory_forecast(tiny_overrides, tiny_zoo, tmp_path):
    """With `teachers`, row 1 is checked against every teacher (a mismatched one fails under its
    name), and the one memory row holds every teacher's replicas."""
    from opd.check.memory import DTYPE_BYTES, param_counts

    cfg = load_config([*tiny_overrides, "+teacher@teachers.a=zoo_teacher", "+teacher@teachers.b=zoo_teacher",
                       "task.default_teacher=a"])
    bad = _student_copy(tiny_zoo, tmp_path, lambda d: _set_eos(d, "<unk>"))
    rows = cheap_rows(cfg, str(tiny_zoo.student), {"a": str(tiny_zoo.teacher), "b": str(bad)})
    assert [(r.name, r.verdict) for r in rows if r.name.startswith("tokenizers")] == [
        ("tokenizers: a", Verdict.OK), ("tokenizers: b", Verdict.FAIL)]
    memory = [r for r in rows if r.name == "memory"]
    size = {n: param_counts(p, False).total * DTYPE_BYTES[cfg.teachers[n].dtype]
            for n, p in (("a", str(tiny_zoo.teacher)), ("b", str(bad)))}  # b: the student's copy, smaller
    assert len(memory) == 1 and memory[0].data["teachers"] == size and size["a"] != size["b"]
    assert sum(r.name == "data" for r in rows) == 1


@pytest.fixture(scope="module")
def plain_rollouts(tiny_cfg, tiny_zoo, student_engine):
    from opd.check import heldout_prompts
    from opd.evaluation import eval_settings
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    prompts = heldout_prompts(tiny_cfg, tok).rows(slice(0, 4))
    return student_engine.generate(prompts, eval_settings(tiny_cfg.rollout.max_new_tokens, greedy=False, seed=1)), tok


@pytest.fixture(scope="module")
def student_engine(engine_pool, tiny_cfg, tiny_zoo):  # module scope: the session pool's engine
    return engine_pool.acquire(tiny_zoo.student, tiny_cfg.rollout)


def test_teacher_parity_passes_and_a_wrong_temperature_fails(tiny_cfg, tiny_zoo, plain_rollouts):
    from opd.check.parity import reference_teacher, teacher_parity_row
    from opd.teacher import TeacherScorer

    rollouts, _ = plain_rollouts
    ref = reference_teacher(str(tiny_zoo.teacher), tiny_cfg)
    right = TeacherScorer(str(tiny_zoo.teacher), tiny_cfg.teacher, tiny_cfg.rollout)
    assert teacher_parity_row(tiny_cfg, right, ref, rollouts).verdict is Verdict.OK

    class HotTeacher:
        """A scorer whose logits are divided by 1.5 on the way: a temperature where none belongs."""

        def __init__(self):
            self.inner = TeacherScorer(str(tiny_zoo.teacher), replace(tiny_cfg.teacher, temperature=1.5),
                                       tiny_cfg.rollout)

        def score(self, r):
            return self.inner.score(r)

    row = teacher_parity_row(tiny_cfg, HotTeacher(), ref, rollouts)
    assert row.verdict is Verdict.FAIL and row.data["max_abs_diff"] > row.data["tolerance"]


def test_student_parity_and_self_distillation_give_zero_for_every_distill(tiny_cfg, tiny_zoo, plain_rollouts):
    from opd.check import learner_rows
    from opd.check.selfdistill import DISTILLS

    rollouts, tok = plain_rollouts
    parity, selfd = learner_rows(tiny_cfg, str(tiny_zoo.student), rollouts, tok)
    assert parity.verdict is Verdict.OK, parity.found
    assert selfd.verdict is Verdict.OK, selfd.found
    for d in DISTILLS:
        r = selfd.data[d]
        assert abs(r["loss"]) < 1e-4 and abs(r["kl"]) < 1e-4 and r["grad_norm"] < 1e-3, (d, r)


def test_length_forecast_flags_the_starting_real_student_not_the_teacher(pair_cfg, pair):
    from opd.check import heldout_prompts
    from opd.rollout import RolloutWorker, shutdown_engine
    from opd.teacher import TeacherScorer
    from opd.zoo import load_tokenizer

    cfg = load_config(["experiment=smollm2_cpu", f"zoo_dir={pair_cfg.zoo_dir}", f"run_dir={pair_cfg.run_dir}"])
    tok = load_tokenizer(pair.student)
    engine = RolloutWorker(str(pair.student), cfg.rollout)
    scorer = TeacherScorer(str(pair.teacher), cfg.teacher, cfg.rollout)
    try:
        length, extraction = sampled_rows(cfg, engine, scorer, heldout_prompts(cfg, tok), tok)
    finally:
        shutdown_engine(engine.llm)
        shutdown_engine(scorer.llm)
    assert length.verdict is Verdict.WARN
    assert length.data["flagged"] == {"student": True, "teacher": False}, length.found
    assert length.data["student"]["truncated_frac"] > 0.8 > length.data["teacher"]["truncated_frac"]
    assert extraction.verdict is Verdict.OK


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_check_exits_0_with_warnings_and_2_with_a_fail(tiny_overrides, monkeypatch, tmp_path):
    import opd.check as check

    rows = [Row("a", Verdict.OK, ["fine"]), Row("b", Verdict.WARN, ["so so"], ["do x"])]
    monkeypatch.setattr(check, "run_check", lambda cfg: rows)
    # opd-check puts its engines in-process; this session's engines are not: keep them as they are
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    monkeypatch.setattr(sys, "argv", ["opd-check", *tiny_overrides, f"run_dir={tmp_path}"])
    check.main()  # warnings only: returns
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["verdict"] == "warn" and [r["name"] for r in doc["rows"]] == ["a", "b"]
    rows.append(Row("c", Verdict.FAIL, ["broken"], ["fix y"]))
    with pytest.raises(SystemExit) as e:
        check.main()
    assert e.value.code == 2


def test_errors_a_user_can_fix_print_alone_and_exit_2(tiny_overrides, tiny_zoo, tmp_path):
    """A bad prompt-file line, a bad config value and a mismatched tokenizer: the message
    alone, status 2, for each entry point; an unexpected error keeps its traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=?"}\n{"prompt": 3}\n')
    paths = [f"student.path={tiny_zoo.student}", f"teacher.path={tiny_zoo.teacher}"]
    file_task = ["task=file", f"task.train_file={bad}", f"run_dir={tmp_path / 'run'}", *paths]
    eos = _student_copy(tiny_zoo, tmp_path, lambda d: _set_eos(d, "<unk>"))
    cases = {
        ("opd.train", *tiny_overrides, *file_task): "bad.jsonl:2: field 'prompt' must be a string, got int",
        ("opd.train", *tiny_overrides, *file_task, "check.enabled=false"): "bad.jsonl:2: field 'prompt' must be",
        ("opd.prepare", *tiny_overrides, "rollout.temperature=-1"): "rollout.temperature must be > 0, got -1",
        ("opd.evaluate", *tiny_overrides, "rollout.temperature=-1"): "rollout.temperature must be > 0, got -1",
        ("opd.check", *tiny_overrides, f"student.path={eos}", f"teacher.path={tiny_zoo.teacher}",
         f"run_dir={tmp_path / 'check'}"): "eos '<unk>' vs '<eos>'",
    }
    for (module, *args), message in cases.items():
        p = _run(module, *args, cwd=tmp_path)
        assert p.returncode == 2, (module, p.returncode, p.stderr[-2000:])
        assert message in p.stderr and "Traceback" not in p.stderr, (module, p.stderr[-2000:])
    p = _run("opd.prepare", *tiny_overrides, f"zoo_dir={bad}", cwd=tmp_path)  # a file where a directory goes
    assert p.returncode == 1 and "Traceback" in p.stderr, p.stderr[-2000:]
