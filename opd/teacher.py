"""Teacher scorer: a frozen teacher that scores the student's exact tokens.

Backends:
- `transformers`: one forward pass over prompt + completion; the logits of completion
  positions go through the LM head in chunks of `chunk_size` positions, so memory stays
  bounded by chunk_size x V; returns the sampled-token log-probs, the top-k, or the full
  distribution.
- `vllm`: `prompt_logprobs` on prompt + completion with `max_tokens=1`; sampled-token or
  top-k (k up to the engine's `max_logprobs`);
- `server`: the same `prompt_logprobs` from a vLLM server over HTTP (opd/teacher_server.py).

Temperature: the teacher's log-probs are log_softmax(logits / teacher.temperature). vLLM's
`prompt_logprobs` ignore sampling temperature, so the vllm and server backends accept only 1.0.

At start, `check_tokenizers` compares each teacher's tokenizer with the student's
(vocabulary, special tokens, chat template) and refuses a mismatch with the reason; models
whose embedding tables differ only by padding rows past the tokenizer's vocabulary are
accepted, and logits are cut to the shared vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from opd.device import pick_device
from opd.errors import UserError
from opd.types import (FinishReason, PromptBatch, RolloutBatch, SamplingSettings, TeacherLogprobs,
                       TeacherScores)

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import RolloutConfig, TeacherConfig


class TokenizerMismatch(UserError, ValueError):
    """The teacher cannot score the student's tokens; the message says why."""


def first_vocab_difference(a: dict, b: dict) -> str:
    only_a = sorted(set(a) - set(b))[:5]
    only_b = sorted(set(b) - set(a))[:5]
    moved = [t for t in sorted(set(a) & set(b)) if a[t] != b[t]][:5]
    return (f"tokens only in the student: {only_a}; only in the teacher: {only_b}; "
            f"same token, other id: {[(t, a[t], b[t]) for t in moved]}")


def check_tokenizers(student_tok: Any, teacher_tok: Any, student_rows: Optional[int] = None,
                     teacher_rows: Optional[int] = None) -> str:
    """Refuse a teacher whose tokenizer would score different tokens than the student's.
    Returns a one-line note of what was checked (and any padding rows tolerated)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        raise TokenizerMismatch(
            f"teacher and student tokenizers differ: vocabulary sizes {len(sv)} (student) vs "
            f"{len(tv)} (teacher); {first_vocab_difference(sv, tv)}. The teacher must score the "
            f"student's exact token ids: pick a teacher of the same tokenizer family.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        s, t = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if s != t:
            raise TokenizerMismatch(f"teacher and student tokenizers differ in {name}: "
                                    f"student {s}, teacher {t}")
    if (student_tok.chat_template or "") != (teacher_tok.chat_template or ""):
        raise TokenizerMismatch("teacher and student tokenizers have different chat templates: "
                                "prompts would be rendered differently for the two models")
    note = f"tokenizers match ({len(sv)} tokens)"
    if student_rows and teacher_rows and student_rows != teacher_rows:
        if min(student_rows, teacher_rows) < len(sv):
            raise TokenizerMismatch(f"a model's embedding has fewer rows than the tokenizer "
                                    f"({student_rows=}, {teacher_rows=}, tokenizer {len(sv)})")
        note += (f"; embedding rows differ only by padding (student {student_rows}, teacher "
                 f"{teacher_rows}): logits are cut to the first {len(sv)} entries")
    return note


def embedding_rows(model_path: str, trust_remote_code: bool = False) -> Optional[int]:
    """Rows of a model's embedding table, read from its config (no weights are loaded)."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    conf = getattr(conf, "text_config", None) or conf  # multimodal configs nest the language model
    return getattr(conf, "vocab_size", None)


def check_pair(student_path: str, teacher_path: str, student_trust: bool = False,
               teacher_trust: bool = False) -> tuple[Any, str]:
    """Start-up check of a student and a teacher: tokenizers and embedding rows (Qwen2.5-0.5B
    has 151,936 rows and 7B 152,064 for the same tokenizer: padding, tolerated; fewer rows
    than tokens is refused). Returns (the student's tokenizer, a one-line note)."""
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(student_path, student_trust)
    return tok, check_model_pair(tok, student_path, teacher_path, student_trust, teacher_trust)


def check_model_pair(student_tok: Any, student_path: str, teacher_path: str, student_trust: bool = False,
                     teacher_trust: bool = False) -> str:
    """`check_pair` with the student's tokenizer already loaded (one per teacher); the note."""
    from opd.zoo import load_tokenizer

    return check_tokenizers(student_tok, load_tokenizer(teacher_path, teacher_trust),
                            embedding_rows(student_path, student_trust), embedding_rows(teacher_path, teacher_trust))


def put_prompt_logprobs(out: TeacherScores, n: int, completion: Sequence[int],
                        by_id: Sequence[dict[int, tuple[float, int]]], k: int) -> None:
    """Row n of `out` from vLLM's `prompt_logprobs` of its completion positions: by_id[t] maps
    token id -> (log-prob, rank in the vocabulary) and holds the top k and the token itself."""
    for t, tok in enumerate(completion):
        out.logprobs_NT[n, t] = by_id[t][tok][0]
        ranked = sorted((x for x in by_id[t].items() if x[1][1] <= k), key=lambda x: x[1][1])[:k]
        for j, (tid, (logprob, _)) in enumerate(ranked):
            out.topk_ids_NTK[n, t, j], out.topk_logprobs_NTK[n, t, j] = tid, logprob


def empty_scores(cfg: TeacherConfig, N: int, T: int, V: int) -> TeacherScores:
    """The arrays a scorer fills in place: sampled-token log-probs, plus the top-k (log-probs
    -inf past the k returned) or the full distribution over V tokens, as `cfg.logprobs` asks."""
    mode, K = TeacherLogprobs(cfg.logprobs), cfg.topk
    topk, full = mode is TeacherLogprobs.TOPK, mode is TeacherLogprobs.FULL
    return TeacherScores(
        logprobs_NT=np.zeros((N, T), np.float32), temperature=cfg.temperature,
        topk_ids_NTK=np.zeros((N, T, K), np.int64) if topk else None,
        topk_logprobs_NTK=np.full((N, T, K), -np.inf, np.float32) if topk else None,
        full_logprobs_NTV=np.zeros((N, T, V), np.float32) if full else None)


class TeacherScorer:
    """Frozen teacher; `score` returns its log-probs of the student's completion tokens.

    Over ~150 lines because it holds both backends (transformers, vLLM) behind one `score`
    and `generate`: each is a few short methods, and splitting them into classes would
    duplicate the shared tokenizer checks and the scores' assembly."""

    def __init__(self, model_path: str, teacher_cfg: TeacherConfig, rollout_cfg: RolloutConfig, device: str = "auto"):
        self.cfg, self.path = teacher_cfg, model_path
        self.mode = TeacherLogprobs(teacher_cfg.logprobs)
        if teacher_cfg.backend == "vllm":
            self._init_vllm(rollout_cfg)
        else:
            self._init_hf(device)
        self.vocab_size = len(self.tokenizer)

    def _init_hf(self, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        dtype = getattr(torch, self.cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=dtype, trust_remote_code=self.cfg.trust_remote_code).to(self.device).eval()
        self.model.requires_grad_(False)
        self.embedding_rows = self.model.get_input_embeddings().weight.shape[0]

    def _init_vllm(self, rollout_cfg: RolloutConfig) -> None:
        from opd.rollout import cpu_engine_env, engine_kwargs

        cpu_engine_env()
        from vllm import LLM

        if errs := self.cfg.cross_checks("teacher."):  # logprobs=full, temperature != 1
            raise ValueError("; ".join(errs))
        self.llm = LLM(**engine_kwargs(self.path, rollout_cfg, seed=0, dtype=self.cfg.dtype,
                                       trust_remote_code=self.cfg.trust_remote_code,
                                       max_logprobs=max(20, self.cfg.topk),
                                       logprobs_mode="raw_logprobs"))
        self.tokenizer = self.llm.get_tokenizer()
        self.embedding_rows = self.llm.llm_engine.model_config.get_vocab_size()

    # ------------------------------------------------------------------ scoring
    def score(self, rollouts: RolloutBatch) -> TeacherScores:
        t0 = time.time()
        scores = empty_scores(self.cfg, len(rollouts.completion_ids), max(1, max(rollouts.lengths)),
                              self.vocab_size)
        if self.cfg.backend == "vllm":
            self._score_vllm(rollouts, scores)
        else:
            self._score_hf(rollouts, scores)
        return replace(scores, seconds=time.time() - t0)

    @torch.no_grad()
    def _score_hf(self, rollouts: RolloutBatch, out: TeacherScores) -> None:
        N, bs = len(rollouts.completion_ids), self.cfg.batch_size
        for start in range(0, N, bs):
            self._score_hf_rows(rollouts, range(start, min(N, start + bs)), out)

    def _score_hf_rows(self, rollouts: RolloutBatch, rows: range, out: TeacherScores) -> None:
        seqs = [rollouts.prompt_ids[n] + rollouts.completion_ids[n] for n in rows]
        S = max(map(len, seqs))
        ids = torch.full((len(seqs), S), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
        hidden = self.model.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).last_hidden_state
        # (row, position-of-logit, completion index t, target token) for every completion token
        where = [(i, len(rollouts.prompt_ids[n]) + t - 1, t, tok) for i, n in enumerate(rows)
                 for t, tok in enumerate(rollouts.completion_ids[n])]
        for c in range(0, len(where), self.cfg.chunk_size):
            self._score_chunk(hidden, where[c: c + self.cfg.chunk_size], rows, out)

    def _score_chunk(self, hidden: torch.Tensor, where: list, rows: range, out: TeacherScores) -> None:
        bi = torch.tensor([w[0] for w in where], device=hidden.device)
        pi = torch.tensor([w[1] for w in where], device=hidden.device)
        logits = self.model.lm_head(hidden[bi, pi]).float()[:, : self.vocab_size]
        logp = torch.log_softmax(logits / self.cfg.temperature, dim=-1)
        tgt = torch.tensor([w[3] for w in where], device=logp.device)
        lp_tok = logp.gather(1, tgt[:, None])[:, 0].cpu().numpy()
        n_idx = np.array([rows[w[0]] for w in where])
        t_idx = np.array([w[2] for w in where])
        out.logprobs_NT[n_idx, t_idx] = lp_tok
        if self.mode is TeacherLogprobs.TOPK:
            v, i = logp.topk(self.cfg.topk, dim=-1)
            out.topk_ids_NTK[n_idx, t_idx] = i.cpu().numpy()
            out.topk_logprobs_NTK[n_idx, t_idx] = v.cpu().numpy()
        if self.mode is TeacherLogprobs.FULL:
            out.full_logprobs_NTV[n_idx, t_idx] = logp.cpu().numpy()

    def _score_vllm(self, rollouts: RolloutBatch, out: TeacherScores) -> None:
        from vllm import SamplingParams

        k = self.cfg.topk if self.mode is TeacherLogprobs.TOPK else 0
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0)
        seqs = [p + c for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        for n, o in enumerate(outs):
            P = len(rollouts.prompt_ids[n])
            # {token id: Logprob(logprob, rank)} per position
            by_id = [{i: (e.logprob, e.rank) for i, e in pos.items()} for pos in o.prompt_logprobs[P:]]
            put_prompt_logprobs(out, n, rollouts.completion_ids[n], by_id, k)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        """Teacher samples: reference lengths at start, and off-policy (sequence-level KD)
        completions. Sampler log-probs are not needed there and are returned as zeros."""
        t0 = time.time()
        if self.cfg.backend == "vllm":
            from opd.rollout import seeded_params

            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts.prompt_ids],
                                     seeded_params(sampling, len(prompts.prompt_ids), logprobs=None), use_tqdm=False)
            per_prompt = [[(list(o.token_ids), o.finish_reason) for o in out.outputs] for out in outs]
        else:
            per_prompt = self._hf_sample(prompts.prompt_ids, sampling)
        rows = [(p, c, r) for p, outs in zip(prompts.prompt_ids, per_prompt) for c, r in outs]
        comp = [c for _, c, _ in rows]
        return RolloutBatch(
            prompt_ids=[list(p) for p, _, _ in rows], completion_ids=comp,
            sampler_logprobs=[[0.0] * len(c) for c in comp],
            finish_reasons=[FinishReason.of(r) for _, _, r in rows],
            texts=self.tokenizer.batch_decode(comp, skip_special_tokens=True),
            weight_version=-1, seconds=time.time() - t0)

    @torch.no_grad()
    def _hf_sample(self, prompts: list[list[int]], s: SamplingSettings) -> list[list[tuple[list[int], str]]]:
        """All prompts in one left-padded `generate`; (completion ids, finish reason) per sample."""
        pad, eos, W = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, max(map(len, prompts))
        ids = torch.tensor([[pad] * (W - len(p)) + list(p) for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        out = self.model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
            do_sample=s.temperature > 0, temperature=s.temperature if s.temperature > 0 else None,
            top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else None, pad_token_id=pad, eos_token_id=eos)
        rows = []
        for row in out[:, W:].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            rows.append((row[:cut], FinishReason.STOP if eos in row else FinishReason.LENGTH))
        return [rows[i * s.n: (i + 1) * s.n] for i in range(len(prompts))]

    def ready(self) -> tuple[int, int]:
        """(tokenizer vocabulary size, embedding rows) for the start-up checks."""
        return self.vocab_size, self.embedding_rows
