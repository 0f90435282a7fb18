"""Where the work runs: the rollout workers, the teacher pool and the learner as Ray actors,
or as plain objects in this process (`resources.use_ray=false`, for tests and debugging).

`Workers` is the one handle the driver loop uses. Its methods are the loop's verbs
(`opd.types.LoopWorkers`) and hide whether a call crosses a process: with Ray each call
is a remote call waited on with `resources.remote_timeout_s`, so a hung actor becomes a
clear `ActorError` naming the actor and the call, never a silent hang (`ActorCalls`).

Rollout workers and the `resources.teacher_workers` teacher replicas are data parallel: a
call's batch is shared among them and the answers joined in order (`opd.data_parallel`).
With several teachers (`teachers`), each has its own `resources.teacher_workers` replicas
and scores the rows that name it.
One whose process dies is rebuilt here, up to `resources.max_actor_restarts` times each,
and its share of the call is sent again (every verb but `train` is a pure function of its
arguments and the weights); a rebuilt rollout worker first takes the learner's current
weights and version. A dead learner (any rank of a sharded one, `opd.learner_group`) is
rebuilt, every rank of it, by the loop from the newest checkpoint (`restart_learner`). Each
restart is printed and kept as an event for the step's metrics line.

Models and losses are *what*; this file is *where* (docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from opd import learner_group as group
from opd.config import ONE_TEACHER
from opd.console import filter_benign_vllm_warnings, redirect_output
from opd.data_parallel import by_teacher, generate_calls, join_by_prompt, routed_generate_calls, routed_score_calls
from opd.types import (ActorDied, ActorError, CheckpointState, LearnerDied, PromptBatch, RolloutBatch,
                       SamplingSettings, TeacherScores, TrainBatch, WeightUpdate)

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    import numpy as np

    from opd.config import ResourcesConfig, TeacherConfig, TrainConfig


def start_ray(resources: Any, debug: bool = False) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray. Returns True if started.
    Unless `debug`, the actors' output stays in their log files and Ray's banners are off."""
    import ray

    if ray.is_initialized():
        return False
    common = dict(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}},
                  log_to_driver=debug, logging_level=logging.INFO if debug else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        return False
    try:
        _init_local_ray(resources, common)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its raylet is late
        # Ray gives its raylet 30 s to register, which a heavily loaded machine can miss
        ray.shutdown()
        print(f"Ray did not start ({e}); trying once more", flush=True)
        _init_local_ray(resources, common)
    return True


def _init_local_ray(resources: Any, common: dict) -> None:
    import ray

    # address="local": always a new instance; without it ray.init joins any cluster that
    # `ray start` left on this machine (and then refuses num_cpus)
    ray.init(address="local", num_cpus=resources.ray_num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", **common)


class _Actor:
    """A handle on one actor that can be rebuilt (`restart`) from its class and arguments."""

    def __init__(self, cls: type, name: str, args: tuple, opts: Optional[dict] = None):
        self.cls, self.name, self.args, self.opts, self.restarts = cls, name, args, opts or {}, 0
        self.start()

    def restart(self, *args) -> None:
        """Drop the old instance and build a new one (with new arguments, if given)."""
        try:
            self.kill()
        except Exception:  # noqa: BLE001 - the old one is usually dead already
            pass
        self.args, self.restarts = args or self.args, self.restarts + 1
        self.start()


class _Local(_Actor):
    """In-process stand-in for an actor handle: same interface, no Ray."""

    def start(self) -> None:
        self.obj = self.cls(*self.args)

    def submit(self, method: str, *args):
        return getattr(self.obj, method)(*args)

    def kill(self) -> None:
        self.obj = None


class _Remote(_Actor):
    """A Ray actor; `opts` are its `.options()` (resources, runtime_env)."""

    def start(self) -> None:
        import ray

        # max_restarts=0: a dead actor is rebuilt by `Workers`, which also reloads its state
        self.handle = ray.remote(self.cls).options(name=None, max_restarts=0, **self.opts).remote(*self.args)

    def submit(self, method: str, *args):
        return getattr(self.handle, method).remote(*args)

    def pid(self) -> int:
        """The actor's process id (for tests that kill it)."""
        import ray

        return ray.get(self.handle.__ray_call__.remote(_getpid), timeout=60)

    def kill(self) -> None:
        import ray

        ray.kill(self.handle, no_restart=True)


def _getpid(_instance: Any) -> int:
    return os.getpid()


def _in_actor(cls: type, log_path: Optional[str]) -> type:
    """`cls` whose constructor first sends the actor process's output to `log_path` (None:
    leave it to Ray), and then filters vLLM's benign warnings."""

    class InActor(cls):
        def __init__(self, *args):
            if log_path:
                redirect_output(log_path)
            super().__init__(*args)
            filter_benign_vllm_warnings()

    InActor.__name__ = InActor.__qualname__ = cls.__name__
    return InActor


def _make(cls: type, name: str, use_ray: bool, num_cpus: float, num_gpus: float,
          env: dict, *args, log_dir: Optional[str] = None, opts: Optional[dict] = None) -> _Actor:
    """An actor `name` (or a plain object); with `log_dir` its output goes to `<log_dir>/<name>.log`;
    `opts`: more Ray options (a placement group's scheduling strategy)."""
    if not use_ray:
        local = _Local(cls, name, args)
        filter_benign_vllm_warnings()
        return local
    log_path = os.path.join(log_dir, f"{name}.log") if log_dir else None
    return _Remote(_in_actor(cls, log_path), name, args, {"num_cpus": num_cpus, "num_gpus": num_gpus,
                                                          "runtime_env": {"env_vars": env}, **(opts or {})})


def _rollout_env(ncpu: int) -> dict:
    # Inside an actor process the engine can run in-process (starts ~4x faster, less memory);
    # that process holds no learner (docs/architecture.md, "Engines").
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(ncpu),
           "TOKENIZERS_PARALLELISM": "false"}
    if "TORCH_COMPILE_DISABLE" in os.environ:  # set by rollout.cpu_engine_env on CPU machines
        env["TORCH_COMPILE_DISABLE"] = os.environ["TORCH_COMPILE_DISABLE"]
    return env


def teacher_class(served: bool) -> type:
    """The teacher replicas' class: an engine or model here, or a client of teacher.url."""
    if served:
        from opd.teacher_server import ServedTeacher

        return ServedTeacher
    from opd.teacher import TeacherScorer

    return TeacherScorer


def check_resources(r: ResourcesConfig, n_teachers: int = 1) -> None:
    """Refuse at start what the Ray cluster cannot hold: an actor that can never be scheduled
    would otherwise only surface as a timeout much later. `n_teachers`: teachers, each with
    resources.teacher_workers replicas."""
    import ray

    have, reps = ray.cluster_resources(), n_teachers * r.teacher_workers
    asks = {"CPU": (r.rollout_workers * r.rollout_num_cpus + reps * r.teacher_num_cpus
                    + r.learner_workers * r.learner_num_cpus, "cpus"),
            "GPU": (r.rollout_workers * r.rollout_num_gpus + reps * r.teacher_num_gpus
                    + r.learner_workers * r.learner_num_gpus, "gpus")}
    teachers = f"{n_teachers} teachers x " if n_teachers > 1 else ""
    for kind, (need, unit) in asks.items():
        if need > have.get(kind, 0.0) + 1e-9:
            raise ValueError(
                f"resources: the actors ask for {need:g} {kind} (resources.rollout_workers x "
                f"resources.rollout_num_{unit} + {teachers}resources.teacher_workers x resources.teacher_num_{unit} + "
                f"resources.learner_workers x "
                f"resources.learner_num_{unit}) "
                f"but the Ray cluster has {have.get(kind, 0.0):g}")


class ActorCalls:
    """Calls to actors, wherever they run: submitted together, then waited on (with Ray under
    `resources.remote_timeout_s`, so a hung actor is an `ActorError` naming it and the call).
    An actor found dead goes to `_dead`: restarted, up to `resources.max_actor_restarts` times,
    and its call sent again. Each restart is printed and kept as an event."""

    cfg: TrainConfig
    use_ray: bool
    timeout: float  # resources.remote_timeout_s
    max_restarts: int  # resources.max_actor_restarts
    restarts: int  # restarts so far, of all actors
    events: list[dict]  # restart events not yet logged

    def gather(self, calls: Sequence[tuple[Any, str, tuple] | tuple[Any, str]],
               timeout: Optional[float] = None) -> list:
        """Submit every (actor, method, args) call, then wait for all of them."""
        calls = [(c[0], c[1], c[2] if len(c) > 2 else ()) for c in calls]
        return self._results(calls, self._submit(calls), timeout)

    def call(self, actor: _Actor, method: str, *args) -> Any:
        return self.gather([(actor, method, args)])[0]

    @staticmethod
    def _submit(calls: list[tuple[Any, str, tuple]]) -> list:
        """Send every (actor, method, args) call without waiting (in process: run it)."""
        return [actor.submit(method, *args) for actor, method, args in calls]

    def _results(self, calls: list[tuple[Any, str, tuple]], refs: list, timeout: Optional[float] = None) -> list:
        """The answers of submitted calls (in process: the answers themselves)."""
        if not self.use_ray:
            return refs
        return [self._wait(call, ref, timeout or self.timeout) for call, ref in zip(calls, refs)]

    def _wait(self, call: tuple[Any, str, tuple], ref: Any, timeout: float) -> Any:
        import ray

        actor, method, args = call
        while True:
            try:
                return ray.get(ref, timeout=timeout)
            except ray.exceptions.GetTimeoutError as e:
                raise ActorError(f"{actor.name}.{method} did not answer within "
                                 f"{timeout:.0f}s (resources.remote_timeout_s)") from e
            except ray.exceptions.RayActorError as e:
                self._dead(actor, f"{actor.name}.{method}: the actor died ({type(e).__name__})", e)
                ref = actor.submit(method, *args)
            except ray.exceptions.RayError as e:
                raise ActorError(f"{actor.name}.{method} failed: {e}") from e

    def _dead(self, actor: _Actor, reason: str, err: Exception) -> None:
        """An actor found dead during a call: rebuilt, so that the call can be sent again."""
        self.restart(actor, reason)

    def restart(self, actor: _Actor, reason: str, *args) -> None:
        """Rebuild a dead actor (with new constructor arguments, if given); an event on the
        console and in the metrics."""
        self._check_budget(actor, reason)
        actor.restart(*args)
        self._count_restart(actor.name, actor.restarts, reason)
        self.gather([(actor, "ready")], self.cfg.resources.startup_timeout_s)
        self._restarted(actor)

    def _check_budget(self, actor: _Actor, reason: str) -> None:
        """Refuse a restart past resources.max_actor_restarts (`ActorDied`, with `reason`)."""
        if actor.restarts >= self.max_restarts:
            raise ActorDied(f"{reason}; it was restarted {actor.restarts} times already "
                            f"(resources.max_actor_restarts={self.max_restarts})")

    def _count_restart(self, name: str, restart: int, reason: str) -> None:
        """A restart, counted, kept as an event for the step's metrics, and printed."""
        self.restarts += 1
        self.events.append({"event": "restart", "actor": name, "restart": restart, "reason": reason})
        print(f"fault: {reason}; restarted {name} ({restart} of at most {self.max_restarts})", flush=True)

    def _restarted(self, actor: _Actor) -> None:
        """What a rebuilt actor needs before it takes calls again (here: nothing)."""

    def take_events(self) -> list[dict]:
        """Restart events since the last call (for the current step's metrics line)."""
        out, self.events = self.events, []
        return out


class Workers(ActorCalls):
    """The rollout workers, the teacher pool and the learner, wherever they run: the loop's
    verbs (`opd.types.LoopWorkers`) as calls to them."""

    teacher_eval: Optional[tuple[RolloutBatch, RolloutBatch]]  # the teacher's greedy and sampled held-out completions

    def __init__(self, cfg: TrainConfig, student_path: str, teacher_path: str | Mapping[str, str],
                 teacher_eval_prompts: Optional[PromptBatch] = None, start_path: Optional[str] = None):
        """`student_path`: the weights to start from (a checkpoint when resuming);
        `teacher_path`: the teacher's, or with `teachers` each one's by name;
        `start_path`: the run's original student (the learner's divergence anchor)."""
        from opd.learner import Learner
        from opd.rollout import RolloutWorker, cpu_engine_env

        cpu_engine_env()
        r, self.cfg = cfg.resources, cfg
        self.student_path = student_path
        self.teacher_paths = dict(teacher_path) if isinstance(teacher_path, Mapping) else {ONE_TEACHER: teacher_path}
        self.start_path = start_path or student_path
        self.use_ray, self.timeout, self.max_restarts = r.use_ray, r.remote_timeout_s, r.max_actor_restarts
        self.rollouts: list[_Actor] = []
        self.learners: list[_Actor] = []  # the learner's ranks (opd.learner_group)
        self.learner_ranks: list[dict] = []  # where each rank runs, and what it holds
        self.restarts, self.events = 0, []
        self.log_dir = (str(Path(cfg.run_dir).resolve() / "logs")
                        if r.use_ray and cfg.log_level != "debug" else None)
        if r.use_ray:
            check_resources(r, len(self.teacher_paths))
        # the teacher's held-out completions come first, while every CPU/GPU is still free (a
        # short-lived engine started later could wait forever for a slot); a served teacher's
        # come from the server, once the teacher pool is up
        served = any(t.backend == "server" for t in cfg.teacher_configs().values())
        self.teacher_eval = self._teacher_eval(teacher_eval_prompts) if teacher_eval_prompts and not served else None
        ncpu = str(os.cpu_count() or 1)
        plain = {"OMP_NUM_THREADS": ncpu, "TOKENIZERS_PARALLELISM": "false"}
        lo = cfg.student.lora
        adapter_rank = lo.r if lo.enabled and lo.sync == "adapter" else 0  # engines: the base + adapters
        self.rollouts = [
            _make(RolloutWorker, f"rollout-{i}", r.use_ray, r.rollout_num_cpus, r.rollout_num_gpus,
                  _rollout_env(int(ncpu)), self.start_path if adapter_rank else student_path, cfg.rollout, i,
                  cfg.student.trust_remote_code, adapter_rank, log_dir=self.log_dir)
            for i in range(r.rollout_workers)]
        self.pools = {name: self._teacher_pool(name, t) for name, t in cfg.teacher_configs().items()}
        self.teachers = [a for pool in self.pools.values() for a in pool]  # every teacher's replicas
        self.placement, opts = group.placement(cfg, r.startup_timeout_s) if r.use_ray else (None, None)
        N = r.learner_workers
        self.learners = [_make(Learner, name, r.use_ray, r.learner_num_cpus, r.learner_num_gpus, plain,
                               student_path, cfg, self.start_path, i, N, log_dir=self.log_dir,
                               opts=opts and opts[i]) for i, name in enumerate(group.rank_names(N))]
        # actor construction (engine start, model load) finishes here, under its own timeout
        self.gather([(a, "ready") for a in self.rollouts + self.teachers + self.learners], r.startup_timeout_s)
        self._join_learners()
        if teacher_eval_prompts and served:
            self.teacher_eval = self._teacher_eval(teacher_eval_prompts)

    def _teacher_pool(self, name: str, t: TeacherConfig) -> list[_Actor]:
        """Teacher `name`'s resources.teacher_workers replicas; actors `teacher`, `teacher-<i>`
        (the one teacher) or `teacher-<name>`, `teacher-<name>-<i>`."""
        r, ncpu = self.cfg.resources, os.cpu_count() or 1
        base = "teacher" if name == ONE_TEACHER and not self.cfg.teachers else f"teacher-{name}"
        return [_make(teacher_class(t.backend == "server"), base if r.teacher_workers == 1 else f"{base}-{i}",
                      r.use_ray, r.teacher_num_cpus, r.teacher_num_gpus, _rollout_env(ncpu), self.teacher_paths[name],
                      t, self.cfg.rollout, self.cfg.optim.device, log_dir=self.log_dir)
                for i in range(r.teacher_workers)]

    def _join_learners(self) -> None:
        """Form the learner ranks' process group (N > 1) and record where each one runs."""
        if len(self.learners) > 1:
            local = not os.environ.get("RAY_ADDRESS")  # the Ray start_ray started here
            meet = self._on_ranks("rendezvous", [(local,)], self.cfg.resources.startup_timeout_s)[0]
            self._on_ranks("join", [(meet,)] * len(self.learners), self.cfg.resources.startup_timeout_s)
        self.learner_ranks = self._on_ranks("where")

    # ------------------------------------------------------------------ faults
    def _dead(self, actor: _Actor, reason: str, err: Exception) -> None:
        """A dead learner is the loop's to restore from a checkpoint; any other actor is rebuilt."""
        if actor in self.learners:
            raise LearnerDied(reason) from err
        super()._dead(actor, reason, err)

    def _restarted(self, actor: _Actor) -> None:
        """A rebuilt rollout worker takes the learner's current weights first, so its weight
        version never goes backwards."""
        if actor in self.rollouts:
            parts = self._on_ranks("export_shards", [(self.cfg.rollout.dtype,)] * len(self.learners))
            self.call(actor, "load_weights", *parts)

    def restart_learner(self, ckpt: Optional[Path], reason: str) -> Optional[CheckpointState]:
        """A new learner from `ckpt` (or the run's starting point), synced to every rollout
        worker. Returns the loop state saved with the checkpoint (None: start of the run)."""
        path = str(ckpt or self.student_path)
        reason = f"{reason}; restoring it from {path}"
        first, N = self.learners[0], len(self.learners)
        if first.restarts >= self.max_restarts:
            raise ActorDied(f"{reason}; it was restarted {first.restarts} times already "
                            f"(resources.max_actor_restarts={self.max_restarts})")
        for i, rank in enumerate(self.learners):  # every rank: the process group is formed anew
            rank.restart(path, self.cfg, self.start_path, i, N)
        self._count_restart("learner", first.restarts, reason)
        self.gather([(a, "ready") for a in self.learners], self.cfg.resources.startup_timeout_s)
        self._join_learners()
        extra = self.load_checkpoint(path) if (Path(path) / "learner_state.json").is_file() else None
        self.sync()
        return extra

    def _on_ranks(self, method: str, args: Optional[list[tuple]] = None, timeout: Optional[float] = None) -> list:
        """`method` on every learner rank (`args[i]` to rank i; default no arguments), waited
        on together (`opd.learner_group.wait_ranks`); their answers in rank order."""
        args = args or [()] * len(self.learners)
        ranks = self.learners[: len(args)]
        refs = self._submit([(a, method, x) for a, x in zip(ranks, args)])
        return group.wait_ranks(ranks, method, refs, timeout or self.timeout) if self.use_ray else refs

    # ------------------------------------------------------------------ the loop's verbs
    def generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        """Split the prompts over the rollout workers (data parallel) and join the results."""
        return self.generate_async(prompts, sampling)()

    def generate_async(self, prompts: PromptBatch, sampling: SamplingSettings) -> Callable[[], RolloutBatch]:
        """Start `generate` and return at once; calling the result waits for the rollouts (with
        Ray the workers generate meanwhile; in process they already have)."""
        calls, merge = generate_calls(self.rollouts, prompts, sampling)
        refs = self._submit(calls)
        return lambda: merge(self._results(calls, refs))

    def score(self, rollouts: RolloutBatch, teachers: Sequence[str] = ()) -> TeacherScores:
        """Row n scored by teacher `teachers[n]` (none: the one teacher), each teacher's rows
        shared over its replicas by token count; the scores joined in row order."""
        calls, merge = routed_score_calls(self.pools, rollouts, teachers)
        return merge(self.gather(calls))

    def teacher_generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        """Each prompt answered by the teacher it names, split over that teacher's replicas as
        `generate` does; the results joined in prompt order."""
        calls, merge = routed_generate_calls(self.pools, prompts, sampling)
        return merge(self.gather(calls))

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One step on every learner rank (a sharded learner: each on its share of `batch`)."""
        if len(self.learners) == 1:
            return self._on_ranks("train_step", [(batch,)])[0]
        from opd.learner.split import split_batch

        shares = split_batch(batch, len(self.learners), self.cfg.optim.micro_batch_size)
        return {**self._on_ranks("train_step", shares)[0], **group.whole_batch_metrics(batch)}

    def sync(self) -> tuple[list[WeightUpdate], list[int]]:
        """Learner -> every rollout worker; returns the update's parts (one per learner rank)
        and the workers' versions. With Ray each rank's arrays are stored once in the object
        store and every worker (and this driver, for the version) reads them in place: their
        references are passed on, never fetched and put again here. A sharded learner's
        ranks each send their own shards, which every worker joins (`WeightUpdate.join`):
        faster than gathering on rank 0 (docs/results.md §10)."""
        args = [(self.cfg.rollout.dtype,)] * len(self.learners)
        if not self.use_ray:
            parts = self._on_ranks("export_shards", args)
            return parts, self.gather([(w, "load_weights", tuple(parts)) for w in self.rollouts])
        refs = self._submit([(a, "export_shards", x) for a, x in zip(self.learners, args)])
        parts = group.wait_ranks(self.learners, "export_shards", refs, self.timeout)
        return parts, self.gather([(w, "load_weights", tuple(refs)) for w in self.rollouts])

    def save_checkpoint(self, path: str, state: CheckpointState) -> str:
        """The learner's weights and optimizer, with the loop's state, at `path`."""
        return self._on_ranks("save_checkpoint", [(path, state.as_dict())] * len(self.learners))[0]

    def load_checkpoint(self, path: str) -> CheckpointState:
        """The learner's state from `path` (its weights were loaded at start); the loop's."""
        return CheckpointState.from_dict(self._on_ranks("load_checkpoint", [(path,)] * len(self.learners))[0])

    def student_logprobs(self, batch: TrainBatch) -> np.ndarray:
        """The learner's log-probs of a batch's target tokens [B, S] (0 off the mask)."""
        if len(self.learners) == 1:
            return self._on_ranks("logprobs", [(batch,)])[0]
        from opd.learner.split import split_rows

        shares = split_rows(batch, len(self.learners), self.cfg.optim.micro_batch_size)
        answers = self._on_ranks("logprobs", [(b, plan) for _, b, plan in shares])
        return group.merge_logprobs([(rows, lp) for (rows, _, _), lp in zip(shares, answers)],
                                    batch.input_ids_BS.shape)

    def _teacher_eval(self, prompts: PromptBatch) -> tuple[RolloutBatch, RolloutBatch]:
        """The teachers' greedy and sampled held-out completions, each prompt's from its own
        teacher: from a short-lived vLLM engine per teacher, one at a time (with a served
        teacher among them: every teacher's from the teacher pools)."""
        from opd.evaluation import eval_settings

        n, teachers = self.cfg.rollout.eval_max_new_tokens, self.cfg.teacher_configs()
        if any(t.backend == "server" for t in teachers.values()):
            return tuple(self.teacher_generate(prompts, eval_settings(n, greedy)) for greedy in (True, False))
        groups = by_teacher(prompts.teachers) or {ONE_TEACHER: list(range(len(prompts.prompt_ids)))}
        outs = [self._engine_eval(name, prompts.select(rows), [eval_settings(n, g) for g in (True, False)])
                for name, rows in groups.items()]
        return tuple(join_by_prompt([o[k] for o in outs], list(groups.values()), 1) for k in (0, 1))

    def _engine_eval(self, name: str, prompts: PromptBatch, settings: list[SamplingSettings]) -> list[RolloutBatch]:
        """Teacher `name`'s completions of `prompts` under each of `settings`, from a short-lived engine."""
        from opd.rollout import RolloutWorker

        r = self.cfg.resources
        engine = _make(RolloutWorker, "teacher-eval" if name == ONE_TEACHER else f"teacher-eval-{name}",
                       self.use_ray, r.teacher_num_cpus, r.teacher_num_gpus, _rollout_env(os.cpu_count() or 1),
                       self.teacher_paths[name], self.cfg.rollout, 0,
                       self.cfg.teacher_configs()[name].trust_remote_code, log_dir=self.log_dir)
        try:
            return self.gather([(engine, "generate", (prompts, s)) for s in settings], r.startup_timeout_s)
        finally:
            engine.kill()

    def shutdown(self) -> None:
        for a in self.rollouts + self.teachers + self.learners:
            try:
                a.kill()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        group.release(getattr(self, "placement", None))
