"""`opd-train`: the one Hydra entry point of a distillation run.

    opd-train                                   # the default experiment (conf/train.yaml)
    opd-train loss=smpo steps=100 rollout.temperature=1.2
    opd-train run_dir=runs/my-run resume=auto   # continue from the newest checkpoint
    RAY_ADDRESS=... opd-train resources=gpu ... # join an existing Ray cluster (ray job submit)

It validates the config once, builds the zoo if the task needs it, checks the teacher's
tokenizer against the student's, starts (or joins) Ray, builds the actors, runs the loop
(`opd.loop`), writes summary.json, and shuts everything down, also on Ctrl-C and on an
actor error: a clear message, a final checkpoint where possible, no orphan processes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from opd.config import CONF_DIR, ONE_TEACHER, register_configs, to_dataclass
from opd.errors import exit_on_user_error

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare_run(cfg: TrainConfig):
    """Everything before the actors: paths (checked), models, opd-check's cheap rows
    (tokenizers, memory, data), tokenizers (checked), prompts, run dir."""
    from opd.check import check_at_start
    from opd.config import ConfigError, as_dict
    from opd.learner.lora import check_targets
    from opd.preflight import check_start
    from opd.run_io import RunDir, resolve_resume
    from opd.prompt_files import FormatRule, load_splits
    from opd.zoo import load_tokenizer, resolve_model_paths, teacher_paths

    check_start(cfg)
    run = RunDir(cfg.run_dir, cfg.loggers, config=as_dict(cfg))
    student_path, paths = resolve_model_paths(cfg)[0], teacher_paths(cfg)
    resume = resolve_resume(cfg.resume, run)
    if resume is not None:
        student_path = str(resume)  # the checkpoint is a Hugging Face model dir
    tok = load_tokenizer(student_path, cfg.student.trust_remote_code)
    checked = {name: _check_teacher(cfg, name, tok, student_path, path) for name, path in paths.items()}
    if why := check_targets(student_path, cfg.student):
        raise ConfigError(f"cannot start:\n  {why}")
    check_at_start(cfg, student_path, paths)  # opd-check's cheap rows (check.enabled)
    print(f"student: {student_path}", flush=True)
    for name, (path, note) in checked.items():
        print(f"{cfg.teacher_key(name)}: {path}\n{note}", flush=True)
    max_prompt = cfg.rollout.max_model_len - cfg.rollout.max_new_tokens
    f = cfg.format
    rule = FormatRule(tuple(f.checks), f.on_prompt_file, tuple(f.extra_tokens))
    train, heldout = load_splits(cfg.task, tok, max_prompt, rule, teachers=list(cfg.teachers))
    teacher_path = {n: p for n, (p, _) in checked.items()} if cfg.teachers else checked[ONE_TEACHER][0]
    return run, student_path, teacher_path, resume, tok, train, heldout


def _check_teacher(cfg: TrainConfig, name: str, tok: Any, student_path: str, teacher_path: Any) -> tuple[str, str]:
    """Teacher `name`'s tokenizer checked against the student's `tok` (a served teacher's
    through its server); a mismatch is refused naming the teacher's key. Returns the teacher's
    path (a served model's name) and a one-line note."""
    from opd.teacher import TokenizerMismatch

    t = cfg.teacher_configs()[name]
    try:
        if t.backend != "server":
            from opd.teacher import check_model_pair

            return teacher_path, check_model_pair(tok, student_path, teacher_path, cfg.student.trust_remote_code,
                                                  t.trust_remote_code)
        from opd.teacher_server import check_server

        return check_server(t, cfg.rollout, tok)
    except TokenizerMismatch as e:
        raise TokenizerMismatch(f"{cfg.teacher_key(name)} ({teacher_path}): {e}") from None


def run_training(cfg: TrainConfig) -> dict:
    """Run one distillation; returns the summary (also written to run_dir/summary.json)."""
    from opd.actors import Workers, start_ray
    from opd.console import quiet_libraries
    from opd.loop import Distillation
    from opd.zoo import resolve_model_paths
    from opd.run_io import environment

    t0 = time.time()
    if not cfg.resources.use_ray:  # the engines run in this process (with Ray: in actors, logged to files)
        quiet_libraries(cfg.log_level == "debug")
    run, student_path, teacher_path, resume, tok, train, heldout = prepare_run(cfg)
    run.write_json("config.json", run.config)
    started_ray = start_ray(cfg.resources, cfg.log_level == "debug") if cfg.resources.use_ray else False
    workers = None
    loop = None
    try:
        from opd.tasks import prompt_batch

        eval_prompts = prompt_batch(tok, heldout) if heldout else None
        start = resolve_model_paths(cfg)[0] if resume else student_path  # the anchor's reference
        workers = Workers(cfg, student_path, teacher_path, teacher_eval_prompts=eval_prompts, start_path=start)
        _print_learner_group(workers.learner_ranks)
        params = {k: workers.learner_ranks[0][k] for k in ("trainable_params", "total_params")}
        _print_trained_params(cfg, **params)
        state = workers.load_checkpoint(str(resume)) if resume else None
        if resume:  # the engines started on the checkpoint's weights; now they carry its step as
            workers.sync()  # their version too, so the first rollouts are not read as stale
        loop = Distillation(cfg, workers, tok, train, heldout, run)
        summary = loop.run(state).as_dict()
        summary.update(total_seconds=time.time() - t0, run_dir=str(run.path.resolve()), steps=cfg.steps,
                       environment=environment(), student_path=student_path, teacher_path=teacher_path,
                       teachers=list(cfg.teachers), learner_ranks=workers.learner_ranks, **params)
        run.write_json("summary.json", summary)
        _write_report(run.path)
        return summary
    except BaseException as e:
        _save_on_failure(loop, e)
        raise
    finally:
        _shut_down(run, workers, started_ray)


def _print_learner_group(ranks: list[dict]) -> None:
    """One line per rank of a sharded learner: where it runs and the bytes it holds."""
    if len(ranks) < 2:
        return
    for r in ranks:
        print(f"learner rank {r['rank']} of {len(ranks)}: node {r['node_id'][:12]}, pid {r['pid']}, "
              f"{r['param_bytes'] / 2**20:.1f} MiB of parameters", flush=True)


def _print_trained_params(cfg: TrainConfig, trainable_params: int, total_params: int) -> None:
    """How much of the student trains: every weight, or LoRA's adapters."""
    lo = cfg.student.lora
    what = (f"LoRA r={lo.r} alpha={lo.alpha:g} on {', '.join(lo.target_modules)}" if lo.enabled
            else "every weight")
    print(f"learner: {what}: {trainable_params / 1e6:.2f}M of {total_params / 1e6:.2f}M parameters train "
          f"({100 * trainable_params / total_params:.1f}%)", flush=True)


def _shut_down(run: Any, workers: Any, started_ray: bool) -> None:
    """Close the run's loggers, stop the actors, and stop Ray if this run started it."""
    run.close()
    if workers is not None:
        workers.shutdown()
    if started_ray:
        import ray

        ray.shutdown()


def _save_on_failure(loop: Any, err: BaseException) -> None:
    what = "interrupted" if isinstance(err, KeyboardInterrupt) else f"stopped by an error: {err}"
    print(f"\nrun {what}", file=sys.stderr, flush=True)
    if loop is None or loop.step == 0:
        return
    try:
        path = loop.checkpoint()
        print(f"saved a checkpoint of step {loop.step} at {path}; continue with "
              f"run_dir={loop.run_dir.path} resume=auto", file=sys.stderr, flush=True)
    except Exception as e2:  # noqa: BLE001 - the learner itself may be what failed
        print(f"no final checkpoint ({e2}); the newest periodic one is in "
              f"{loop.run_dir.ckpt_root}", file=sys.stderr, flush=True)


def _write_report(run_dir: Any) -> None:
    """Plots and report.md; a failure here never fails a finished run."""
    from opd.report import write_report

    try:
        out = write_report(run_dir)
        print(f"report: {out}", flush=True)
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        print(f"no report ({type(e).__name__}: {e}); try opd-report {run_dir}", file=sys.stderr, flush=True)


def print_table(s: dict) -> None:
    from opd.evaluation import table, teacher_tables

    if s.get("eval", {}).get("before"):
        print("\nheld-out, teacher vs student before and after training")
        print(table(s["eval"]))
        if s.get("teachers"):
            print(teacher_tables(s["eval"], s["teachers"]))
    else:
        print("\nno held-out prompts: nothing was evaluated (task.heldout_file)")
    if s.get("starved_steps"):
        print(f"warning: {s['starved_steps']} of {s['steps']} steps trained on nothing or on less than "
              f"length.penalties.min_effective_weight of their tokens (see length/effective_weight in metrics.jsonl)")
    if (s.get("early_stop") or {}).get("stop"):
        print(f"stopped early after {s.get('steps_done')} of {s['steps']} steps: {s['early_stop']['reason']}")
    print(f"wall time {s['total_seconds']:.0f}s; run dir {s['run_dir']}", flush=True)


def multirun_dir(node: DictConfig) -> None:
    """Under `opd-train -m`, each job's run_dir is its own Hydra job directory
    (hydra.sweep.dir/hydra.sweep.subdir): `${now:...}` is resolved once per process, so the
    default run_dir would be shared by every job of the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        node.run_dir = hc.runtime.output_dir


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@exit_on_user_error("opd-train")
def _hydra_main(node: DictConfig) -> None:
    multirun_dir(node)
    cfg = to_dataclass(node)
    print_table(run_training(cfg))


def main() -> None:
    register_configs()
    try:
        _hydra_main()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
