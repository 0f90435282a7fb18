"""Learner: the student in PyTorch. Recomputes log-probs, applies the losses, steps AdamW.

A plain class (`Learner`); `opd.actors` wraps it as a Ray actor. What it does per step:
1. split the TrainBatch into micro-batches of rows (and of SMPO pairs);
2. recompute the student's log-probs of the target tokens (logits / sampler temperature): the
   decoder over the rows, then the LM head on the trained tokens only, in chunks, each with
   one log_softmax that also gives what the distillation terms need (`forward`): no
   [B, T, V] logits are ever held;
3. the objective (`objective`): distill_coef * distillation + smpo_coef * SMPO + SFT + the
   length remedies the batch carries, each a pure function of `opd.losses`; token-mean terms
   are normalised by the whole batch's token count, pair terms by its pair count, so the
   gradient does not depend on how the batch is split into micro-batches;
4. clip the global gradient norm, step AdamW and the LR schedule; a non-finite loss or
   gradient norm skips the AdamW step instead (`optim/skipped`), and `optim.max_bad_steps`
   such steps in a row stop the run.

Weights leave as numpy arrays under Hugging Face names (`export_weights`, no copy of fp32
weights here), for the rollout workers' in-place reload. Checkpoints (`checkpoint`) are a
Hugging Face model directory (loadable by transformers and vLLM) plus the learner's state.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from opd.device import pick_device
from opd.learner import checkpoint, lora, objective, shard
from opd.learner.forward import StudentForward, batch_shape_metrics
from opd.types import TrainBatch, WeightUpdate

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import TrainConfig


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the base LR at a step: linear warmup, then constant or cosine."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class BadStepsError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm (optim.max_bad_steps)."""


class Learner:
    """Holds the student, its optimizer and schedule; trains on TrainBatches. One of
    `world` ranks of a sharded learner when `world` > 1 (`opd.learner.shard`): it then
    holds 1/world of the student once `join` has formed the process group."""

    def __init__(self, model_path: str, cfg: TrainConfig, start_path: Optional[str] = None,
                 rank: int = 0, world: int = 1):
        """`model_path`: the weights to train (the student, or a checkpoint when resuming);
        `start_path`: the run's starting student (the divergence anchor), default model_path."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.loss_cfg, self.optim_cfg = cfg, cfg.loss, cfg.optim
        self.rank, self.world = rank, world
        self.device = pick_device(self.optim_cfg.device)
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.student.trust_remote_code)
        start_path = start_path or model_path
        adapter = lora.saved_adapter(model_path, start_path) if cfg.student.lora.enabled else None
        # fp32 master weights; bf16 compute through autocast (one device) or FSDP2's policy. A
        # LoRA student resuming from a checkpoint: its base is the start, its adapter the checkpoint's
        self.model = AutoModelForCausalLM.from_pretrained(
            start_path if adapter else model_path, dtype=torch.float32,
            trust_remote_code=cfg.student.trust_remote_code)
        if self.optim_cfg.gradient_checkpointing:  # non-reentrant: composes with autocast, FSDP2 and LoRA
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.peft = lora.wrap(self.model, cfg.student.lora, adapter) if cfg.student.lora.enabled else None
        self.model.train()
        self.vocab_size = len(self.tokenizer)
        # the only remedy setting read from the config: whether batches may ask for the anchor,
        # so the frozen copy is kept (a LoRA student's is its base); its weight per step comes
        # with each batch (anchor_coef)
        keeps_anchor = cfg.length.mode == "auto" and cfg.length.remedies.anchor_coef > 0
        self.anchor = self._frozen(start_path) if keeps_anchor and not self.peft else None
        self.keeps_anchor = keeps_anchor
        self.step = 0
        self.skipped, self.bad_in_row = 0, 0  # skipped steps: in all, and the current run of them
        if world == 1:
            self._build()

    def join(self, init_method: str) -> None:
        """Form the process group with the other ranks (at rank 0's `rendezvous`), shard the
        student (and the anchor) and build the optimizer."""
        shard.init_group(self.rank, self.world, init_method, self.cfg.resources.remote_timeout_s, self.device)
        self._build()

    def _build(self) -> None:
        """The trained module, the optimizer and its schedule, on this rank's device."""
        bf16 = self.cfg.student.dtype == "bfloat16"  # on CPU as on CUDA
        if self.world > 1:
            self.whole = shard.shard(self.model, self.device, bf16)
            anchor = self.anchor and shard.shard(self.anchor, self.device, bf16, frozen=True)
        else:
            self.whole = shard.Whole(self.model.to(self.device))
            anchor = self.anchor and shard.Whole(self.anchor.to(self.device))
        if self.peft and self.keeps_anchor:
            anchor = lora.Base(self.whole, self.peft)
        oc = self.optim_cfg
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=oc.lr,
                                     betas=(oc.beta1, oc.beta2), weight_decay=oc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(oc.schedule, oc.warmup_steps, self.cfg.steps, oc.min_lr_ratio))
        self.forward = StudentForward(self.whole, anchor, self.device, bf16 and self.world == 1, self.vocab_size)

    def _frozen(self, path: str) -> torch.nn.Module:
        """The run's starting student, frozen: the reference of the divergence anchor (a
        resumed or restarted learner loads it from the start path, not from its checkpoint)."""
        from transformers import AutoModelForCausalLM

        anchor = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=self.cfg.student.trust_remote_code)
        return anchor.eval().requires_grad_(False)

    def train_step(self, b: TrainBatch, plan: Optional[objective.RankPlan] = None) -> dict[str, float]:
        """One optimizer step. A non-finite loss or gradient norm skips the update (the grads
        are dropped, the LR schedule still advances) and counts in `optim/skipped`. `plan`:
        this rank's share of a sharded step; the metrics are then the whole batch's."""
        t0 = time.time()
        self.opt.zero_grad(set_to_none=True)
        acc = objective.backward(self.forward, self.loss_cfg, b, self.optim_cfg.micro_batch_size, self.step, plan)
        clip = self.optim_cfg.grad_clip
        grad_norm = shard.clip_global_norm(list(self.model.parameters()), clip if clip > 0 else float("inf"))
        lr = self.sched.get_last_lr()[0]
        losses_ok = all(math.isfinite(v) for k, vs in acc.items() if k.endswith("_total") for v, _ in vs)
        if shard.agree(losses_ok) and math.isfinite(grad_norm):
            self.opt.step()
            self.bad_in_row = 0
        else:
            self._skip_update(grad_norm)
        with warnings.catch_warnings():  # torch warns if the first step skipped optimizer.step()
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.step += 1
        ranks = shard.gather_objects((acc, peak_rss_mb(), time.time() - t0))  # every rank's, in rank order
        out = {k: objective.combine(k, vs) for k, vs in objective.merge([a for a, _, _ in ranks]).items()}
        return {**out, "optim/grad_norm": grad_norm, "optim/lr": lr, "optim/skipped": float(self.skipped),
                "learner/tokens": max(1.0, b.num_tokens), "learner/step": self.step,
                **batch_shape_metrics(b), "learner/peak_rss_mb": max(r for _, r, _ in ranks),
                "time/learn_compute": max(t for _, _, t in ranks)}

    def _skip_update(self, grad_norm: float) -> None:
        """A bad step: drop the gradients; too many in a row stop the run (the learner's step
        is then still the last completed one, so the driver's final checkpoint matches it)."""
        self.opt.zero_grad(set_to_none=True)
        self.bad_in_row += 1
        if self.bad_in_row >= self.optim_cfg.max_bad_steps:
            raise BadStepsError(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient norm (last grad "
                f"norm {grad_norm}), optim.max_bad_steps={self.optim_cfg.max_bad_steps}: stopping. "
                f"Check the teacher's log-probs and the losses' inputs, or lower optim.lr")
        self.skipped += 1

    def ready(self) -> int:
        """Answers once the model is loaded (start-up has its own timeout); the process id."""
        return os.getpid()

    def rendezvous(self, local: bool) -> str:
        """Where the ranks meet (`shard.rendezvous`), asked of rank 0."""
        return shard.rendezvous(local)

    def where(self) -> dict:
        """This rank: its node, process, and the bytes of its parameters, gradients and
        optimizer state (its shards of them when sharded)."""
        node = ""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except ImportError:
            pass
        return {"rank": self.rank, "node_id": node, "pid": os.getpid(), **lora.counts(self.model),
                **shard.local_bytes(self.model, self.opt)}

    @torch.no_grad()
    def logprobs(self, b: TrainBatch, plan: Optional[objective.RankPlan] = None) -> np.ndarray:
        """The student's log-probs of every target token [B, S] (0 where masked). `plan`: this
        rank's share of a sharded forward (padded to its micro-batch count)."""
        out = np.zeros(b.input_ids_BS.shape, np.float32)
        mb = self.optim_cfg.micro_batch_size
        starts = range(0, 0 if plan and plan.padding else len(out), mb)
        for i in starts:
            rows = np.arange(i, min(len(out), i + mb))
            f = self.forward(b, rows)
            f.win.scatter(out[rows[0]: rows[-1] + 1], f.lp_BT.cpu().numpy())
        for _ in range((plan.row_chunks if plan else 0) - len(starts)):  # padding: join the others' gathers
            self.forward(b, np.arange(1))
        self.forward.release()
        return out

    def state_for_sync(self, dtype: str = "float32", gather: bool = True) -> dict[str, torch.Tensor]:
        """The weights in `dtype` under Hugging Face names: whole (`gather`; a collective when
        sharded) or this rank's dim-0 shards (no communication); a tied LM head is left out:
        the engine reads the embedding."""
        t = getattr(torch, dtype)
        sd = checkpoint.full_weights(self.model) if gather else self._local_weights()
        if self.peft:
            sd = lora.merged(sd, lora.scale(self.cfg.student.lora))
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return {k: v.to(t).contiguous() for k, v in sd.items()}

    def _local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's dim-0 shards of the state dict on the CPU; a LoRA adapter's A whole (a
        collective when sharded): the merge multiplies a shard of B's rows by all of A."""
        return {k: (shard.full_tensor if lora.is_adapter_a(k) else shard.local)(v.detach()).cpu()
                for k, v in self.model.state_dict().items()}

    def export_weights(self, dtype: str = "float32") -> Optional[WeightUpdate]:
        """The weights for the rollout workers (a LoRA student's adapter with
        student.lora.sync=adapter); when sharded, rank 0 gathers them (every rank joins) and
        the others return None."""
        update = self.export_shards(dtype) if self._syncs_adapter else self._timed(lambda: self.state_for_sync(dtype))
        return update if self.rank == 0 else None

    def export_shards(self, dtype: str = "float32") -> WeightUpdate:
        """This rank's dim-0 shards of the weights in `dtype` (the rollout workers join the
        ranks' parts, `WeightUpdate.join`); one learner's are the whole weights. A synced
        adapter is small: rank 0 sends it whole, the others nothing."""
        if self._syncs_adapter:
            return self._timed(lambda: self._adapter_for_sync(dtype), lora.adapter_config(self.peft))
        return self._timed(lambda: self.state_for_sync(dtype, gather=False))

    @property
    def _syncs_adapter(self) -> bool:
        return self.peft is not None and self.cfg.student.lora.sync == "adapter"

    def _adapter_for_sync(self, dtype: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors in `dtype` under peft's names, gathered (a collective when
        sharded): rank 0's; {} on the others."""
        sd = checkpoint.full_weights(self.model, getattr(torch, dtype), keep=lora.is_adapter)
        return lora.adapter_state(self.peft, sd) if self.rank == 0 else {}

    def _timed(self, weights: Callable[[], dict[str, torch.Tensor]], adapter: Optional[dict] = None) -> WeightUpdate:
        """A WeightUpdate of `weights()` at this step, with the seconds they took."""
        t0 = time.time()
        sd = weights()
        return WeightUpdate.from_tensors(self.step, sd, seconds=time.time() - t0, adapter=adapter)

    def save_checkpoint(self, ckpt_dir: str | Path, extra: dict) -> str:
        """A Hugging Face model dir + learner state (`checkpoint.save`); `extra` is JSON (data
        cursor, monitor). When sharded every rank gathers and rank 0 writes."""
        counters = {"step": self.step, "skipped": self.skipped, "bad_in_row": self.bad_in_row}
        weights = checkpoint.full_weights(self.model)
        optimizer = checkpoint.optimizer_by_name(self.model, self.opt)
        if self.rank:
            return str(ckpt_dir)
        if not self.peft:
            return checkpoint.save(ckpt_dir, self.model, self.tokenizer, weights, optimizer, self.sched, counters,
                                   extra)
        return checkpoint.save(  # the merged model, and the adapter in peft's format beside it
            ckpt_dir, self.model, self.tokenizer, lora.merged(weights, lora.scale(self.cfg.student.lora)),
            optimizer, self.sched, counters, extra,
            also=lambda d: lora.save_adapter(self.peft, d / lora.ADAPTER_DIR, weights))

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict:
        """Restore the learner state saved next to the model weights (loaded at start); the `extra`."""
        counters, extra = checkpoint.load(ckpt_dir, self.model, self.opt, self.sched)
        self.step, self.skipped, self.bad_in_row = counters["step"], counters["skipped"], counters["bad_in_row"]
        return extra
