"""A served teacher (`teacher.backend=server`): a vLLM server's completions endpoint scores the
student's tokens and samples the teacher's own completions, over HTTP.

    vllm serve <teacher> --host 127.0.0.1 --port 8000 --max-model-len 4096
    opd-train teacher.backend=server teacher.url=http://127.0.0.1:8000 teacher.logprobs=topk

Scoring sends prompt + completion as token ids (nothing is retokenised) to `/v1/completions`
with `max_tokens=1` and `prompt_logprobs=k`: k = teacher.topk for logprobs=topk, 0 for sampled
(each position's entry always holds the token at that position too). `teacher.batch_size`
sequences go in one request, `teacher.concurrency` requests at once. The answers fill the same
`TeacherScores` as the in-process vLLM teacher (`opd.teacher.put_prompt_logprobs`): raw
log-probs at temperature 1. Generation sends the prompts' token ids with the sampling
settings and reads the completions' token ids back (`return_token_ids`).

At start, `check_server` finds the served model (teacher.path, or the server's only one), its
context (at least rollout.max_model_len) and its tokenizer (`check_served_tokenizer`), and
refuses a mismatch naming teacher.url. `ServedTeacher` has `TeacherScorer`'s interface, so
the teacher pool (`resources.teacher_workers` replicas) and its restarts work unchanged.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Sequence

from opd.teacher_http import ServerClient, ServerError
from opd.types import FinishReason, PromptBatch, RolloutBatch, SamplingSettings, TeacherLogprobs, TeacherScores

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import RolloutConfig, TeacherConfig

COMPLETIONS = "/v1/completions"
TEST_TEXT = "Hello, world! 12 + 345 = 357.\n\tTabs,  spaces; Über café — ½ ∑ 😀 '\"<>[]{}"


def client_for(cfg: TeacherConfig) -> ServerClient:
    """A client for teacher.url with its timeout, retries, concurrency and API key."""
    key = None
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"teacher.api_key_env={cfg.api_key_env}: no such environment variable "
                             f"is set (it holds the API key of the server at {cfg.url})")
    return ServerClient(cfg.url, cfg.request_timeout_s, cfg.retries, cfg.concurrency, key)


# ------------------------------------------------------------------ requests and answers
def score_body(model: str, seqs: Sequence[Sequence[int]], k: int) -> dict:
    """Score `seqs` (prompt + completion ids each): prompt log-probs, top k, one token out."""
    return {"model": model, "prompt": [list(s) for s in seqs], "max_tokens": 1, "temperature": 1.0,
            "prompt_logprobs": k}


def generate_body(model: str, prompts: Sequence[Sequence[int]], s: SamplingSettings) -> dict:
    """Sample `s.n` completions of each prompt, as `opd.rollout.to_sampling_params` does."""
    return {"model": model, "prompt": [list(p) for p in prompts], "n": s.n, "max_tokens": s.max_new_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else 0,
            "repetition_penalty": s.repetition_penalty, "stop": list(s.stop),
            "stop_token_ids": list(s.stop_token_ids), "seed": s.seed, "skip_special_tokens": True,
            "return_token_ids": True}


def _choices(answer: Any, count: int, where: str) -> list[dict]:
    """The answer's choices in index order; exactly `count` of them."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != count:
        got = len(choices) if isinstance(choices, list) else "none"
        raise ServerError(f"teacher server {where} answered wrongly: {got} choices for {count} prompts")
    return sorted(choices, key=lambda c: c.get("index", 0))


def parse_prompt_logprobs(answer: Any, seqs: Sequence[Sequence[int]], start: Sequence[int],
                          where: str) -> list[list[dict[int, tuple[float, int]]]]:
    """Per sequence, its positions from `start[i]` on: {token id: (log-prob, rank)}, checked
    to be one entry per position that holds the position's own token."""
    out = []
    for seq, P, c in zip(seqs, start, _choices(answer, len(seqs), where)):
        pos = c.get("prompt_logprobs")
        if not isinstance(pos, list) or len(pos) != len(seq):
            got = len(pos) if isinstance(pos, list) else "no"
            raise ServerError(f"teacher server {where} answered wrongly: {got} prompt_logprobs for a "
                              f"sequence of {len(seq)} tokens (choice {c.get('index')})")
        try:
            rows = [{int(t): (float(e["logprob"]), int(e["rank"])) for t, e in p.items()} for p in pos[P:]]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ServerError(f"teacher server {where} answered wrongly: a prompt_logprobs entry "
                              f"without logprob and rank ({type(e).__name__}: {e})") from None
        if any(tok not in r for tok, r in zip(seq[P:], rows)):
            raise ServerError(f"teacher server {where} answered wrongly: a position's prompt_logprobs "
                              f"lack the token at that position")
        out.append(rows)
    return out


def parse_generation(answer: Any, n_prompts: int, n: int, where: str) -> list[tuple[list[int], str, str]]:
    """(completion ids, text, finish reason) per sample, prompt by prompt (n each)."""
    out = []
    for c in _choices(answer, n_prompts * n, where):
        ids = c.get("token_ids")
        if not isinstance(ids, list):
            raise ServerError(f"teacher server {where} answered wrongly: a choice without token_ids "
                              f"(a vLLM server that knows return_token_ids is needed)")
        out.append(([int(i) for i in ids], str(c.get("text", "")), c.get("finish_reason")))
    return out


# ------------------------------------------------------------------ start-up checks
def served_model(client: ServerClient, name: Optional[str]) -> dict:
    """The /v1/models entry of `name` (teacher.path), or of the server's only model."""
    models = client.get("/v1/models").get("data") or []
    ids = [m.get("id") for m in models]
    if name is not None:
        if name not in ids:
            raise ValueError(f"teacher.path={name} is not served at {client.url} (teacher.url), which "
                             f"serves {ids}; set teacher.path to one of them, or null")
        return models[ids.index(name)]
    if len(models) != 1:
        raise ValueError(f"the server at {client.url} (teacher.url) serves {len(models)} models {ids}: "
                         f"name one with teacher.path")
    return models[0]


def check_server(cfg: TeacherConfig, rollout_cfg: RolloutConfig, student_tok: Any) -> tuple[str, str]:
    """Refuse a server that cannot be the teacher: unreachable, a model it does not serve, a
    context shorter than rollout.max_model_len, another tokenizer. Returns (the served
    model's name, a one-line note)."""
    client = client_for(cfg)
    model = served_model(client, cfg.path)
    context = model.get("max_model_len")
    if isinstance(context, int) and context < rollout_cfg.max_model_len:
        raise ValueError(f"the model served at {client.url} (teacher.url) has a context of {context} "
                         f"tokens, less than rollout.max_model_len={rollout_cfg.max_model_len}: serve it "
                         f"with --max-model-len {rollout_cfg.max_model_len} or more")
    note = check_served_tokenizer(client, model["id"], student_tok)
    return model["id"], f"teacher server: {client.url}; {note}"


def check_served_tokenizer(client: ServerClient, model: str, tok: Any) -> str:
    """The served model's tokenizer must be the student's: the same ids for a test string
    (with and without special tokens), for each special token and for a chat turn through
    the chat template; the same text for ids spread over the vocabulary, up to its last id;
    and no token past it."""
    from opd.teacher import TokenizerMismatch

    for check in (_test_string, _special_tokens, _chat_turn, _vocabulary):
        if why := check(client, model, tok):
            raise TokenizerMismatch(f"the model served at {client.url} (teacher.url) does not have the "
                                    f"student's tokenizer: {why}. The teacher must score the student's "
                                    f"exact token ids")
    return f"tokenizers match ({len(tok)} tokens; checked through the server's /tokenize and /detokenize)"


def _tokenize(client: ServerClient, model: str, text: str, special: bool) -> list[int]:
    return client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": special})["tokens"]


def _test_string(client: ServerClient, model: str, tok: Any) -> Optional[str]:
    text = TEST_TEXT + "".join(tok.all_special_tokens)
    for special in (False, True):
        ours, theirs = tok.encode(text, add_special_tokens=special), _tokenize(client, model, text, special)
        if ours != theirs:
            i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return (f"{text!r} (add_special_tokens={special}) is {len(ours)} tokens for the student and "
                    f"{len(theirs)} for the server, first different at token {i}: student {ours[i:i + 4]}, "
                    f"server {theirs[i:i + 4]}")
    return None


def _special_tokens(client: ServerClient, model: str, tok: Any) -> Optional[str]:
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        s, i = getattr(tok, name, None), getattr(tok, f"{name}_id", None)
        if s is not None and (theirs := _tokenize(client, model, s, False)) != [i]:
            return f"{name} {s!r} is id {i} for the student and {theirs} for the server"
    return None


def _chat_turn(client: ServerClient, model: str, tok: Any) -> Optional[str]:
    """A user turn rendered by each side's chat template, as opd.tasks.encode_prompt does."""
    if not tok.chat_template:
        return None
    chat = [{"role": "user", "content": "12+34="}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ours = list(tok(text, add_special_tokens=False)["input_ids"])
    try:
        theirs = client.post("/tokenize", {"model": model, "messages": chat, "add_generation_prompt": True})["tokens"]
    except ServerError as e:
        return f"its chat template cannot render a user turn ({e})"
    if ours != theirs:
        return f"a user turn through the chat templates is {ours} for the student and {theirs} for the server"
    return None


def _vocabulary(client: ServerClient, model: str, tok: Any) -> Optional[str]:
    V = len(tok)
    ids = sorted(set(range(0, V, max(1, V // 64))) | {V - 1})
    if client.post("/detokenize", {"model": model, "tokens": ids})["prompt"] != tok.decode(ids):
        return f"ids spread over the student's vocabulary of {V} decode to other text on the server"
    if _past_vocabulary(client, model, V):
        return f"the server has a token at id {V}, past the student's vocabulary of {V}"
    return None


def _past_vocabulary(client: ServerClient, model: str, V: int) -> bool:
    """Whether the server decodes id V to text (a tokenizer of V tokens decodes it to nothing,
    or refuses it)."""
    try:
        return bool(client.post("/detokenize", {"model": model, "tokens": [V]}, retries=0)["prompt"])
    except ServerError as e:
        if e.status is not None and 400 <= e.status < 600:
            return False
        raise


# ------------------------------------------------------------------ the teacher
class ServedTeacher:
    """`TeacherScorer`'s interface (`score`, `generate`, `ready`) on a served model: holds a
    client where the scorer holds an engine. `model_path`: the served model's name (from
    `check_server`; None: the server's only model)."""

    def __init__(self, model_path: Optional[str], teacher_cfg: TeacherConfig, rollout_cfg: RolloutConfig,
                 device: str = "auto"):
        if errs := teacher_cfg.cross_checks("teacher."):
            raise ValueError("; ".join(errs))
        self.cfg, self.client = teacher_cfg, client_for(teacher_cfg)
        self.model = served_model(self.client, model_path)["id"]
        self.k = teacher_cfg.topk if TeacherLogprobs(teacher_cfg.logprobs) is TeacherLogprobs.TOPK else 0

    def _chunks(self, n: int) -> list[range]:
        bs = self.cfg.batch_size
        return [range(i, min(n, i + bs)) for i in range(0, n, bs)]

    def score(self, rollouts: RolloutBatch) -> TeacherScores:
        from opd.teacher import empty_scores, put_prompt_logprobs

        t0, N = time.time(), len(rollouts.completion_ids)
        out = empty_scores(self.cfg, N, max(1, max(rollouts.lengths)), 0)
        seqs = [list(p) + list(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
        chunks = self._chunks(N)
        answers = self.client.post_all(COMPLETIONS, [score_body(self.model, [seqs[n] for n in r], self.k)
                                                     for r in chunks])
        where = f"{self.client.url}{COMPLETIONS}"
        for rows, answer in zip(chunks, answers):
            starts = [len(rollouts.prompt_ids[n]) for n in rows]
            for n, by_id in zip(rows, parse_prompt_logprobs(answer, [seqs[n] for n in rows], starts, where)):
                put_prompt_logprobs(out, n, rollouts.completion_ids[n], by_id, self.k)
        return replace(out, seconds=time.time() - t0)

    def generate(self, prompts: PromptBatch, sampling: SamplingSettings) -> RolloutBatch:
        """The teacher's completions, as `TeacherScorer.generate` returns them (sampler
        log-probs as zeros; the text as the server decodes it, special tokens skipped)."""
        t0, P = time.time(), prompts.prompt_ids
        # seeded: one request per prompt, for each its own seed (a request applies one to all)
        chunks = self._chunks(len(P)) if sampling.seed is None else [range(i, i + 1) for i in range(len(P))]
        answers = self.client.post_all(COMPLETIONS, [
            generate_body(self.model, [P[i] for i in r], sampling.for_rows(r[0]))
            for r in chunks])
        where = f"{self.client.url}{COMPLETIONS}"
        samples = [s for r, a in zip(chunks, answers) for s in parse_generation(a, len(r), sampling.n, where)]
        comp = [ids for ids, _, _ in samples]
        return RolloutBatch(
            prompt_ids=[list(p) for p in P for _ in range(sampling.n)], completion_ids=comp,
            sampler_logprobs=[[0.0] * len(c) for c in comp],
            finish_reasons=[FinishReason.of(r) for _, _, r in samples],
            texts=[text for _, text, _ in samples], weight_version=-1, seconds=time.time() - t0)

    def ready(self) -> str:
        """The served model's name, once the server answers its health check."""
        self.client.get("/health")
        return self.model
