"""Two teachers, one student, on the toy zoo: does each task learn from its own teacher as
well as it does alone, and worse from the other task's teacher?

    .venv/bin/python benchmarks/exp_two_teachers.py                 # the four runs below
    .venv/bin/python benchmarks/exp_two_teachers.py --solo-steps 200 --eval-every 20

Every run starts from the same student, experiment=toy_two_teachers' (the zoo's addition
student: weak on addition, never trained on reversal), with conf/train.yaml's recipe otherwise:

1. `solo-addition`: task=addition, taught by the addition teacher alone;
2. `solo-reversal`: task=reversal, taught by the reversal teacher alone;
3. `two-teachers`: `experiment=toy_two_teachers` (task=mixed, each task's prompts scored by
   its own teacher), for twice the steps the slower task needed alone;
4. `one-teacher`: run 3 with the addition teacher's model in both places
   (`teachers.reversal.path` = the addition teacher): the reversal prompts are taught by the
   addition teacher, and still reported apart (`eval/reversal/...`); `--baseline-steps`
   steps (default: as long as run 3), compared with run 3 at the same step.

Each task's held-out greedy accuracy is read at every evaluation (metrics.jsonl; the mixed
runs report it per teacher, `eval/<name>/accuracy/greedy`, on the same 200 prompts the solo
run sees). Gap closed = (accuracy - student's at step 0) / (teacher's - student's at step 0),
against that task's own teacher. Steps needed = the first evaluation step at which the gap
closed reaches 0.9 (None: never within the run). Targets: every task of run 3 reaches 0.9
within 2x its solo steps; run 4's reversal accuracy is clearly below run 3's.

The JSON (benchmarks/results/exp_two_teachers-<name>.json) holds the command, the overrides,
the environment (git commit), the zoo markers, every run's evaluation curve and summary, and
the targets' verdicts; `--root` keeps the run directories, and a run whose summary.json is
there is read instead of run again. `--table` prints the markdown table of the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("addition", "reversal")
TARGET_GAP, TARGET_STEPS_RATIO = 0.9, 2.0


def train(root: Path, name: str, overrides: list[str]) -> dict:
    """One `opd-train` (unless its summary exists); its summary and evaluation rows."""
    run_dir = root / name
    if not (run_dir / "summary.json").is_file():
        cmd = [sys.executable, "-m", "opd.train", f"run_dir={run_dir}", *overrides]
        print("+", " ".join(cmd), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "console.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"run_dir": str(run_dir), "overrides": overrides,
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "evals": [r for r in rows if any(k.startswith("eval/") for k in r)]}


def curve(run: dict, key: str) -> list[tuple[int, float]]:
    """(step, held-out value) from step 0 (the summary's before) to the last evaluation and
    the end of the run (its after); `key` as in an eval view (`accuracy/greedy`, `addition/kl`)."""
    s = run["summary"]
    mid = [(r["step"], r[f"eval/{key}"]) for r in run["evals"] if f"eval/{key}" in r]
    return [(0, s["eval"]["before"][key]), *mid, (s["steps_done"], s["eval"]["after"][key])]


def task_figures(run: dict, key_prefix: str) -> dict:
    """A task's teacher, start and end accuracy, gap-closed curve and steps to 90% in a run
    (`key_prefix`: "" for a solo run, "<teacher>/" in a mixed one)."""
    t = run["summary"]["eval"]["teacher"][f"{key_prefix}accuracy/greedy"]
    acc = curve(run, f"{key_prefix}accuracy/greedy")
    before = acc[0][1]
    gaps = [(step, (a - before) / (t - before) if t > before else None) for step, a in acc]
    reached = [step for step, g in gaps if g is not None and g >= TARGET_GAP]
    return {"teacher": t, "before": before, "after": acc[-1][1], "gap_closed": gaps[-1][1],
            "steps_to_90": min(reached) if reached else None, "accuracy_curve": acc, "gap_curve": gaps,
            "kl_before": run["summary"]["eval"]["before"][f"{key_prefix}kl"],
            "kl_after": run["summary"]["eval"]["after"][f"{key_prefix}kl"]}


def verdicts(solo: dict, two: dict, one: dict, steps: int) -> dict:
    """Each target, met or missed, with its numbers."""
    out = {}
    for task in TASKS:
        need = solo[task]["steps_to_90"]
        bound = TARGET_STEPS_RATIO * need if need is not None else None
        got = two[task]["steps_to_90"]
        out[f"{task}_closes_90pct_within_2x_solo_steps"] = {
            "solo_steps_to_90": need, "bound": bound, "two_teacher_steps_to_90": got,
            "solo_gap_closed_at_end": solo[task]["gap_closed"],
            "two_teacher_gap_closed_at_end": two[task]["gap_closed"], "two_teacher_steps": steps,
            "met": got is not None and bound is not None and got <= bound,
            # the same number of this task's prompts: solo step s against two-teacher step 2s
            "gap_closed_solo_step_vs_two_teacher_2x_step": matched(solo[task]["gap_curve"], two[task]["gap_curve"])}
    end = one["reversal"]["accuracy_curve"][-1][0]  # the baseline's last step, and run 3 at that step
    own = dict(two["reversal"]["accuracy_curve"])[end]
    out["reversal_worse_from_the_addition_teacher"] = {
        "step": end, "two_teachers_reversal_accuracy": own,
        "one_teacher_reversal_accuracy": one["reversal"]["after"],
        "difference": own - one["reversal"]["after"], "met": own - one["reversal"]["after"] >= 0.1}
    return out


def matched(solo: list, two: list) -> list[dict]:
    """(s, solo gap closed at step s, two-teacher gap closed at step 2s) wherever both were evaluated."""
    at = dict((step, g) for step, g in two)
    return [{"solo_step": st, "solo": g, "two_teacher_step": 2 * st, "two_teacher": at[2 * st]}
            for st, g in solo if 2 * st in at]


def markdown_table(result: dict) -> str:
    """The README's and docs/results.md's table, from the JSON."""
    def cell(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    rows = ["| run | task | teacher of the task's prompts | teacher's accuracy | student before | after | "
            "gap closed | steps to 90% of the gap | steps |", "|---|---|---|---|---|---|---|---|---|"]
    kinds = (("solo", "solo-{}", "its own"), ("two_teachers", "two-teachers", "its own"),
             ("one_teacher", "one-teacher", None))
    for key, run, who in kinds:
        for task in TASKS:
            f = result[key][task]
            teacher = who or ("addition" if task == "reversal" else "its own")
            steps = result[{"solo": "solo_steps", "two_teachers": "two_teacher_steps"}.get(key, "one_teacher_steps")]
            rows.append(f"| {run.format(task)} | {task} | {teacher} | {cell(f['teacher'])} | {cell(f['before'])} | "
                        f"{cell(f['after'])} | {cell(f['gap_closed'], '{:.0%}') if who else '-'} | "
                        f"{cell(f['steps_to_90'], '{}') if who else '-'} | {steps} |")
    return "\n".join(rows)


def zoo_markers(paths: list[str]) -> dict:
    from opd.zoo import zoo_info

    keys = ("heldout_exact_match", "sft_steps", "weights_sha256")
    return {p: {k: (zoo_info(p) or {}).get(k) for k in keys} for p in paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--solo-steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--baseline-steps", type=int, default=None, help="steps of run 4 (default: run 3's)")
    ap.add_argument("--zoo-dir", default=os.environ.get("OPD_ZOO_DIR", str(Path.home() / ".cache/opd")))
    ap.add_argument("--root", default="runs/exp_two_teachers")
    ap.add_argument("--name", default="toy")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the JSON, run nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = ap.parse_args()
    out = Path(f"benchmarks/results/exp_two_teachers-{args.name}.json")
    if args.table:
        print(markdown_table(json.loads(out.read_text())))
        return
    from opd.config import load_config
    from opd.run_io import environment
    from opd.zoo import resolve_model_paths, teacher_paths

    base = [f"zoo_dir={args.zoo_dir}", f"eval_every={args.eval_every}", "checkpoint_every=0", *args.overrides]
    mixed = load_config(["experiment=toy_two_teachers", *base])
    student, teachers = resolve_model_paths(mixed)[0], teacher_paths(mixed)  # built here if missing
    common = [f"student.path={student}", *base]
    root = Path(args.root)
    runs = {f"solo-{t}": train(root, f"solo-{t}", [f"task={t}", f"teacher.path={teachers[t]}",
                                                   f"steps={args.solo_steps}", *common]) for t in TASKS}
    solo = {t: task_figures(runs[f"solo-{t}"], "") for t in TASKS}
    need = [solo[t]["steps_to_90"] or args.solo_steps for t in TASKS]
    steps = int(TARGET_STEPS_RATIO * max(need))
    runs["two-teachers"] = train(root, "two-teachers", ["experiment=toy_two_teachers", f"steps={steps}", *common])
    baseline = args.baseline_steps or steps
    runs["one-teacher"] = train(root, "one-teacher", ["experiment=toy_two_teachers", f"steps={baseline}",
                                                      f"teachers.reversal.path={teachers['addition']}", *common])
    two = {t: task_figures(runs["two-teachers"], f"{t}/") for t in TASKS}
    one = {t: task_figures(runs["one-teacher"], f"{t}/") for t in TASKS}  # "teacher": the addition model's
    result = {"command": " ".join(sys.argv), "overrides": args.overrides, "solo_steps": args.solo_steps,
              "eval_every": args.eval_every, "two_teacher_steps": steps, "one_teacher_steps": baseline,
              "environment": environment(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "student": student, "teachers": teachers,
              "zoo": zoo_markers([student, *teachers.values()]), "solo": solo, "two_teachers": two,
              "one_teacher": one, "targets": verdicts(solo, two, one, steps),
              "runs": {k: {"run_dir": r["run_dir"], "overrides": r["overrides"], "evals": r["evals"],
                           "eval": r["summary"]["eval"], "wall_seconds": r["summary"]["wall_seconds"],
                           "total_seconds": r["summary"]["total_seconds"]} for k, r in runs.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for k, v in result["targets"].items():
        print(f"{k}: {'met' if v['met'] else 'MISSED'} {v}", flush=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
