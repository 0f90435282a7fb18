"""Row 5 of opd-check: will the run fit in memory?

Bytes of the student's training state (fp32 weights 4 a parameter, gradients 4 and AdamW's
two moments 8 a *trained* parameter: a LoRA student's adapters only; the divergence anchor's
frozen copy 4 more), per learner rank when sharded (`resources.learner_workers`); each
teacher's replicas' weights in its dtype; the rollout engines' weights in `rollout.dtype` and
their KV caches. Compared with the machine's memory: CPU RAM here, each GPU's memory where actors ask
for GPUs. Activations come on top and are not counted.

    counts = param_counts(model_path, cfg.student)    # built on the meta device: nothing loaded
    row = memory_row(cfg, forecast(cfg, student, {"teacher": teacher}, on_gpu=False), devices())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from opd.check.report import Row, Verdict

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
CPU_WARN_SHARE = 0.9  # of the memory available now: above it, other processes may push the run out


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int


@dataclass(frozen=True)
class Forecast:
    """Bytes the run holds, by part (per learner rank, and per engine where said)."""

    learner_rank: int  # weights + gradients + AdamW (+ anchor) of one learner rank
    learner_ranks: int
    params: int  # the student's parameters
    trainable: int  # of them, those that train (a LoRA student: its adapters)
    anchor: bool  # the learner holds a frozen copy of the starting student
    teachers: dict[str, int]  # by name: one replica's weights (+ its engine's KV cache); 0 when served
    teacher_workers: int  # replicas of each teacher
    engine: int  # one rollout engine's weights + KV cache (on CPU; on a GPU the engine takes its share)
    rollout_workers: int

    @property
    def total(self) -> int:
        return (self.learner_rank * self.learner_ranks + sum(self.teachers.values()) * self.teacher_workers
                + self.engine * self.rollout_workers)


def param_counts(model_path: str, trust_remote_code: bool, lora_cfg: Any = None) -> ParamCounts:
    """Total and trained parameters of the model at `model_path`, built on the meta device (no
    weights are read); with `lora_cfg` enabled, the adapters are what trains."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from opd.learner import lora

    conf = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
        if lora_cfg is not None and lora_cfg.enabled:
            lora.wrap(model, lora_cfg)
    c = lora.counts(model)
    return ParamCounts(c["total_params"], c["trainable_params"])


def forecast(cfg: TrainConfig, student: ParamCounts, teachers: dict[str, Optional[ParamCounts]],
             on_gpu: bool) -> Forecast:
    """The bytes each part of the run holds under `cfg` (pure); `teachers` by name as in
    `cfg.teacher_configs()` (None: served)."""
    r, rs = cfg.rollout, cfg.resources
    anchor = (cfg.length.mode == "auto" and cfg.length.remedies.anchor_coef > 0 and not cfg.student.lora.enabled)
    state = 4 * student.total + 16 * student.trainable + 4 * student.total * anchor
    kv = 0 if on_gpu else int(r.kv_cache_gib * GIB)
    t_cfgs = cfg.teacher_configs()
    t_bytes = {n: 0 if p is None or t_cfgs[n].backend == "server" else
               p.total * DTYPE_BYTES[t_cfgs[n].dtype] + kv * (t_cfgs[n].backend == "vllm") for n, p in teachers.items()}
    return Forecast(learner_rank=-(-state // rs.learner_workers), learner_ranks=rs.learner_workers,
                    params=student.total, trainable=student.trainable, anchor=anchor,
                    teachers=t_bytes, teacher_workers=rs.teacher_workers,
                    engine=student.total * DTYPE_BYTES[r.dtype] + kv, rollout_workers=rs.rollout_workers)


@dataclass(frozen=True)
class Devices:
    """The machine's memory: RAM in all and available now, and each GPU's (empty: none)."""

    ram_total: int
    ram_available: int
    gpu: tuple[int, ...] = ()


def devices() -> Devices:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    gpus = tuple(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else ()
    return Devices(vm.total, vm.available, gpus)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _gpu_problems(cfg: TrainConfig, f: Forecast, gpu: int) -> list[str]:
    """Parts placed on GPUs that one GPU's memory cannot hold."""
    rs, out = cfg.resources, []
    if rs.learner_num_gpus > 0 and f.learner_rank > gpu * rs.learner_num_gpus:
        out.append(f"a learner rank holds {_gib(f.learner_rank)} of training state, more than its "
                   f"{_gib(gpu * rs.learner_num_gpus)} of GPU memory: raise resources.learner_workers "
                   f"(FSDP2 shards it), or train LoRA adapters (student.lora.enabled=true)")
    for name, size in f.teachers.items():
        if rs.teacher_num_gpus > 0 and size > gpu * rs.teacher_num_gpus:
            key = cfg.teacher_key(name)
            out.append(f"{key}'s {_gib(size)} of weights exceed its {_gib(gpu * rs.teacher_num_gpus)} of GPU "
                       f"memory: give it more (resources.teacher_num_gpus), {key}.dtype=bfloat16, or serve it")
    share = cfg.rollout.gpu_memory_utilization * gpu * max(rs.rollout_num_gpus, 1)
    if rs.rollout_num_gpus > 0 and f.engine > share:
        out.append(f"a rollout engine's weights ({_gib(f.engine)}) exceed its share of GPU memory "
                   f"({_gib(share)}, rollout.gpu_memory_utilization): raise rollout.gpu_memory_utilization")
    return out


def memory_row(cfg: TrainConfig, f: Forecast, d: Devices) -> Row:
    """Row 5: the forecast against the machine. A GPU part that cannot fit, or more than the
    RAM in all, fails; more than the RAM available now warns."""
    rs = cfg.resources
    anchor = " + the anchor's copy" if f.anchor else ""
    found = [f"learner: {_gib(f.learner_rank)} per rank x {f.learner_ranks} (fp32 weights, gradients, "
             f"AdamW{anchor}; {f.trainable / 1e6:.2f}M of {f.params / 1e6:.2f}M parameters train)",
             *[f"{cfg.teacher_key(n)}: {_gib(size)} x {f.teacher_workers}"
               + (" (served: none here)" if not size else "") for n, size in f.teachers.items()],
             f"rollout engines: {_gib(f.engine)} x {f.rollout_workers} (weights in {cfg.rollout.dtype}"
             + (f" + {cfg.rollout.kv_cache_gib:g} GiB KV cache)" if not d.gpu else ")")]
    on_cpu = [f.learner_rank * f.learner_ranks * (rs.learner_num_gpus == 0),
              sum(f.teachers.values()) * f.teacher_workers * (rs.teacher_num_gpus == 0),
              f.engine * f.rollout_workers * (rs.rollout_num_gpus == 0)]
    need = sum(on_cpu)
    found.append(f"in RAM: {_gib(need)} plus activations, of {_gib(d.ram_total)} ({_gib(d.ram_available)} available)")
    problems = _gpu_problems(cfg, f, min(d.gpu)) if d.gpu else []
    verdict, todo = Verdict.OK, list(problems)
    if problems or need > d.ram_total:
        verdict = Verdict.FAIL
    elif need > CPU_WARN_SHARE * d.ram_available:
        verdict = Verdict.WARN
    if need > CPU_WARN_SHARE * d.ram_available:
        todo.append("the run's parts on the CPU need about all the memory: lower rollout.kv_cache_gib, "
                    "train LoRA adapters (student.lora.enabled=true), or serve the teacher (teacher.backend=server)")
    if d.gpu:
        found.append(f"GPUs: {len(d.gpu)} x {_gib(min(d.gpu))}")
    return Row("memory", verdict, found, todo, {**asdict(f), "total": f.total, "ram_needed": need, **asdict(d)})
