"""Several teachers (`teachers`): each prompt names its teacher and is scored by it.

- routing: in a mixed batch every row is scored (and every prompt answered) by its own
  teacher, over that teacher's replicas, and the answers come back in the batch's order:
  fake teachers whose scores say who made them, then two real toy models behind `Workers`;
- the loop hands every rollout's teacher to `score` and logs teacher/<name>/* per teacher;
- a prompt naming an unknown teacher, or none without a default, is refused with file:line;
- a teacher whose tokenizer is not the student's is refused at start, by its key;
- a bad value in teachers.<name>.* is named by its key and range; names that do not exist,
  and teachers whose scores could not join, are refused;
- task=mixed gives each task's own prompts, interleaved, each naming its teacher;
- held-out views per teacher (evaluation.per_teacher) cover exactly that teacher's prompts.
"""

import json
import shutil

import numpy as np
import pytest

from opd.actors import Workers, _Local
from opd.batch import per_teacher_metrics, teacher_kl_metrics
from opd.config import ConfigError, load_config
from opd.prompt_files import DataError, load_splits
from opd.types import PromptBatch, RolloutBatch, TeacherScores

TWO = ["+teacher@teachers.math=zoo_teacher", "+teacher@teachers.words=zoo_teacher"]


class TagTeacher:
    """A fake teacher replica: each token's log-prob is -(tag + token id / 1000), and its own
    completions are [tag]; it records the rows it was given."""

    def __init__(self, tag: int):
        self.tag, self.seen = tag, []

    def score(self, rollouts):
        self.seen.append(len(rollouts.completion_ids))
        T = max(1, max(rollouts.lengths))
        lp = np.zeros((len(rollouts.lengths), T), np.float32)
        for n, c in enumerate(rollouts.completion_ids):
            lp[n, : len(c)] = [-(self.tag + t / 1000) for t in c]
        return TeacherScores(lp, 1.0)

    def generate(self, prompts, sampling):
        n = len(prompts.prompt_ids) * sampling.n
        return RolloutBatch([list(p) for p in prompts.prompt_ids for _ in range(sampling.n)],
                            [[self.tag]] * n, [[0.0]] * n, ["stop"] * n, [str(self.tag)] * n, -1)


def _workers(pools: dict) -> Workers:
    """`Workers` holding only teacher pools of in-process replicas (no engines, no learner)."""
    w = Workers.__new__(Workers)
    w.use_ray, w.restarts, w.events = False, 0, []
    w.pools = pools
    w.teachers = [a for pool in pools.values() for a in pool]
    return w


def _mixed_rollouts(names):
    comps = [[n % 7 + 1] * (1 + n % 4) for n in range(len(names))]  # ragged, row-specific tokens
    return RolloutBatch([[9, n] for n in range(len(names))], comps, [[-0.5] * len(c) for c in comps],
                        ["stop"] * len(comps), [""] * len(comps), 0)


def test_every_row_is_scored_by_its_own_teacher():
    """Rows of two teachers, interleaved; teacher `math` has two replicas: each row's scores
    carry its teacher's tag and its own tokens, in the batch's order, and every replica of
    `math` and the one of `words` got some rows, no row twice."""
    pools = {"math": [_Local(TagTeacher, f"teacher-math-{i}", (100,)) for i in range(2)],
             "words": [_Local(TagTeacher, "teacher-words", (200,))]}
    names = ["math", "words", "words", "math", "math", "words", "math", "math", "words"]
    rollouts = _mixed_rollouts(names)
    got = _workers(pools).score(rollouts, names)
    tag = {"math": 100, "words": 200}
    for n, (name, c) in enumerate(zip(names, rollouts.completion_ids)):
        np.testing.assert_allclose(got.logprobs_NT[n, : len(c)], [-(tag[name] + t / 1000) for t in c], rtol=1e-6)
        assert (got.logprobs_NT[n, len(c):] == 0).all()
    seen = {a.name: sum(a.obj.seen) for pool in pools.values() for a in pool}
    assert all(v > 0 for v in seen.values()) and sum(seen.values()) == len(names), seen


def test_every_prompt_is_answered_by_its_own_teacher():
    from opd.rollout import greedy_settings
    from dataclasses import replace

    pools = {"math": [_Local(TagTeacher, "teacher-math", (1,))], "words": [_Local(TagTeacher, "teacher-words", (2,))]}
    names = ["words", "math", "words", "words", "math"]
    prompts = PromptBatch([[p] for p in range(5)], [None] * 5, [f"p{p}" for p in range(5)], [], names)
    out = _workers(pools).teacher_generate(prompts, replace(greedy_settings(4), n=2))
    assert out.prompt_ids == [[p] for p in range(5) for _ in range(2)]
    assert out.completion_ids == [[{"math": 1, "words": 2}[n]] for n in names for _ in range(2)]


def test_the_loop_names_each_rollouts_teacher_and_logs_each_teacher(tiny_overrides, tmp_path):
    """Distillation passes `score` the teacher of every rollout (its prompt's), and the step's
    metrics count each teacher's rows and tokens and give its KL over its own rows."""
    from test_loop_fakes import FakeWorkers

    from opd.loop import Distillation
    from opd.run_io import RunDir
    from opd.tasks import Example
    from opd.zoo import ensure_tokenizer, load_tokenizer

    class Routed(FakeWorkers):
        def score(self, rollouts, teachers=()):
            self.names.append(list(teachers))
            s = super().score(rollouts)
            for n, t in enumerate(teachers):  # math -1 per token, words -3
                s.logprobs_NT[n] = -1.0 if t == "math" else -3.0
            return s

    cfg = load_config(tiny_overrides + TWO + [
        "task.default_teacher=math", "steps=2", "eval_every=0", "checkpoint_every=0", "length.reference_prompts=0",
        "rollout.max_new_tokens=8", "rollout.prompts_per_step=6", "rollout.samples_per_prompt=2",
        f"run_dir={tmp_path}", "loggers=[]"])
    tok = load_tokenizer(ensure_tokenizer(cfg.zoo_dir))
    train = [Example(None, f"{i}+1", str(i + 1), f"f:{i}", teacher="math" if i % 3 else "words") for i in range(9)]
    w = Routed(tok.eos_token_id, stop_after=2)
    w.names = []
    Distillation(cfg, w, tok, train, [], RunDir(tmp_path)).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(w.names) == 2 and all(len(n) == 12 for n in w.names)
    for names, row in zip(w.names, rows):
        assert row["teacher/math/rows"] == names.count("math") and row["teacher/words/rows"] == names.count("words")
        assert row["teacher/math/tokens"] == 3 * names.count("math")  # 2 tokens + EOS each
        assert row["teacher/math/kl"] == pytest.approx(-1.0 + 1.0) and row["teacher/words/kl"] == pytest.approx(2.0)


def test_per_teacher_metrics_are_each_teachers_own_rows():
    names = ["a", "b", "a", "a", "b"]
    rollouts = _mixed_rollouts(names)
    rng = np.random.default_rng(0)
    scores = TeacherScores(rng.normal(size=(5, 4)).astype(np.float32), 1.0)
    m = per_teacher_metrics(rollouts, scores, names)
    for name in ("a", "b"):
        rows = [n for n, t in enumerate(names) if t == name]
        assert m[f"teacher/{name}/kl"] == pytest.approx(
            teacher_kl_metrics(rollouts.select(rows), scores.select(rows))["teacher/kl"])
        assert m[f"teacher/{name}/rows"] == len(rows)
        assert m[f"teacher/{name}/tokens"] == sum(rollouts.lengths[n] for n in rows)
    assert per_teacher_metrics(rollouts, scores, []) == {}


def test_per_teacher_view_covers_that_teachers_prompts():
    from opd.evaluation import per_teacher

    names = ["x", "y", "x"]
    view = per_teacher(names, lambda rows: {"rows": float(len(rows)), "first": float(rows[0])})
    assert view == {"x/rows": 2.0, "x/first": 0.0, "y/rows": 1.0, "y/first": 1.0}


# ------------------------------------------------------------------ prompt files and tasks
def _file_task(tmp_path, lines, default=None):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    extra = [f"task.default_teacher={default}"] if default else []
    return path, load_config(TWO + ["task=file", f"task.train_file={path}"] + extra).task


def test_prompt_file_lines_name_their_teacher(tmp_path):
    _, task = _file_task(tmp_path, [{"prompt": "1+1", "teacher": "words"}, {"prompt": "2+2"}], default="math")
    train, _ = load_splits(task, teachers=["math", "words"])
    assert [e.teacher for e in train] == ["words", "math"]


@pytest.mark.parametrize("on_bad_line", ["error", "skip"])
def test_unknown_teacher_is_refused_with_file_and_line(tmp_path, on_bad_line):
    path, task = _file_task(tmp_path, [{"prompt": "1+1", "teacher": "math"}, {"prompt": "2+2", "teacher": "mathz"}],
                            default="math")
    task.on_bad_line = on_bad_line  # the line is well formed: the config and the file disagree
    with pytest.raises(DataError, match=rf"^{path}:2: names teacher 'mathz', which is not one of the "
                                        rf"configured teachers \['math', 'words'\]"):
        load_splits(task, teachers=["math", "words"])


def test_a_line_without_teacher_and_no_default_is_refused(tmp_path):
    path, task = _file_task(tmp_path, [{"prompt": "1+1", "teacher": "math"}, {"prompt": "2+2"}])
    with pytest.raises(DataError, match=rf"^{path}:2: names no teacher and task.default_teacher is null"):
        load_splits(task, teachers=["math", "words"])


def test_a_teacher_field_without_teachers_is_refused(tmp_path):
    path, _ = _file_task(tmp_path, [{"prompt": "1+1", "teacher": "math"}])
    task = load_config(["task=file", f"task.train_file={path}"]).task
    with pytest.raises(DataError, match=rf"^{path}:1: names teacher 'math', but the config has no `teachers`"):
        load_splits(task)


def test_mixed_task_interleaves_each_tasks_own_prompts_with_their_teachers():
    from opd.tasks import build_task

    cfg = load_config(TWO + ["task=mixed", "task.heldout_size=5", "task.train_size=50",
                             "+task.teacher_by_task.addition=math", "+task.teacher_by_task.reversal=words"])
    train, held = load_splits(cfg.task, teachers=list(cfg.teachers))
    t = cfg.task
    alone = {n: build_task(n, t.seed, 50, 5, t.max_digits, t.min_chars, t.max_chars).heldout() for n in t.mix}
    assert [e.text or e.messages for e in held[0::2]] == [e.messages for e in alone["addition"]]
    assert [e.messages for e in held[1::2]] == [e.messages for e in alone["reversal"]]
    assert {e.teacher for e in held[0::2] + train[0::2]} == {"math"}
    assert {e.teacher for e in held[1::2] + train[1::2]} == {"words"} and len(train) == 100


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides,message", [
    (["teachers.words.topk=0"], "teachers.words.topk must be >= 1, got 0"),
    (["teachers.math.temperature=-1"], "teachers.math.temperature must be > 0, got -1.0"),
    (["teachers.math.backend=tgi"], "teachers.math.backend must be one of ['transformers', 'vllm', 'server'], got 'tgi'"),
    (["teachers.words.backend=server"], "teachers.words.backend=server needs teachers.words.url"),
    (["teachers.words.logprobs=topk"], "teachers.words.logprobs must equal teachers.math.logprobs (full)"),
    (["task.default_teacher=poetry"], "task.default_teacher must be one of teachers ['math', 'words'], got 'poetry'"),
    (["task=mixed", "+task.teacher_by_task.addition=math", "task.default_teacher=null"],
     "task.teacher_by_task names no teacher for ['reversal'] and task.default_teacher is null"),
    (["+teacher@teachers.bad-name=zoo_teacher"], "teachers.bad-name: a teacher's name must hold only letters"),
])
def test_bad_teachers_value_is_named_by_key_and_range(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TWO + ["task.default_teacher=math"] + overrides)
    assert message in str(e.value)


def test_without_teachers_task_routing_keys_are_refused():
    with pytest.raises(ConfigError, match=r"task.default_teacher needs `teachers`"):
        load_config(["task.default_teacher=math"])


def test_mixed_sft_weights_are_checked():
    with pytest.raises(ConfigError, match=r"student.zoo.task_weights must hold weights > 0, got \[0.5, 0.0\]"):
        load_config(["task=mixed", "student.zoo.task_weights=[0.5,0]"])
    with pytest.raises(ConfigError, match=r"student.zoo.task_weights needs task=mixed and one weight per task "
                                          r"of task.mix \(\['addition', 'reversal'\]\), got \[1.0\]"):
        load_config(["task=mixed", "student.zoo.task_weights=[1]"])


# ------------------------------------------------------------------ real toy teachers
def test_mismatched_tokenizer_is_refused_at_start_naming_the_teacher(tiny_overrides, tiny_zoo, tmp_path):
    """A teacher whose tokenizer renders chat turns differently is refused before any actor
    starts, the message naming teachers.<name> and its path; the good teacher passes."""
    from opd.teacher import TokenizerMismatch
    from opd.train import prepare_run

    bad = tmp_path / "bad-teacher"
    shutil.copytree(tiny_zoo.teacher, bad)
    conf = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": "{{ messages }}"}))
    (bad / "chat_template.jinja").unlink(missing_ok=True)
    cfg = load_config(tiny_overrides + TWO + [
        f"run_dir={tmp_path / 'run'}", f"student.path={tiny_zoo.student}", f"teachers.math.path={tiny_zoo.teacher}",
        f"teachers.words.path={bad}", "task.default_teacher=math", "loggers=[]"])
    with pytest.raises(TokenizerMismatch, match=rf"^teachers.words \({bad}\): .*different chat templates"):
        prepare_run(cfg)


@pytest.mark.slow
def test_real_toy_teachers_score_their_own_rows(tiny_overrides, tiny_zoo):
    """Two real toy models as teachers (the tiny teacher, and the tiny student as a second,
    distinguishable teacher) behind `Workers`: each row of a mixed batch equals what its own
    teacher gives when scoring that row alone, and differs from the other teacher's."""
    from opd.tasks import build_task, prompt_batch
    from opd.teacher import TeacherScorer
    from opd.zoo import load_tokenizer

    cfg = load_config(tiny_overrides + ["teacher.logprobs=topk", "teacher.topk=4"])
    models = {"math": str(tiny_zoo.teacher), "words": str(tiny_zoo.student)}
    pools = {n: [_Local(TeacherScorer, f"teacher-{n}", (p, cfg.teacher, cfg.rollout, "cpu"))] for n, p in models.items()}
    tok = load_tokenizer(tiny_zoo.student)
    exs = build_task("addition", cfg.task.seed, 100, 6, cfg.task.max_digits).heldout()
    prompts = prompt_batch(tok, exs)
    comps = [list(tok(e.answer, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id] for e in exs]
    rollouts = RolloutBatch(prompts.prompt_ids, comps, [[0.0] * len(c) for c in comps], ["stop"] * 6, [""] * 6, 0)
    names = ["math", "words", "words", "math", "words", "math"]
    got = _workers(pools).score(rollouts, names)
    for n, name in enumerate(names):
        L, other = len(comps[n]), "words" if name == "math" else "math"
        own = pools[name][0].obj.score(rollouts.select([n])).logprobs_NT[0, :L]
        np.testing.assert_allclose(got.logprobs_NT[n, :L], own, atol=1e-5)
        assert not np.allclose(own, pools[other][0].obj.score(rollouts.select([n])).logprobs_NT[0, :L], atol=1e-3)
