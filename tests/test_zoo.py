"""Tests of opd/zoo/: the tiny zoo is in Hugging Face format and the teacher beats the
student; artefacts are reused from cache, rebuilt when their spec changes, written
atomically, and built reproducibly (two builds of one spec are bit-identical, another
`zoo.seed` builds other weights, the marker's checksum tells them apart); a layer-dropped
student starts as the teacher's kept layers; and a vLLM engine serving a zoo model agrees with transformers on the log-probs
of sampled tokens (fp32, <= 1e-4) and on greedy decoding."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from opd.config import load_config
from opd.prompt_files import load_splits
from opd.tasks import Example, build_task, encode_prompt, exact_match
from opd.zoo import (MARKER, LayerDrop, ZooPaths, atomic_build, ensure_model, ensure_zoo,
                     greedy_exact_match, load_tokenizer, model_spec, spec_hash, weights_sha256,
                     zoo_info)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _markers(paths: ZooPaths) -> dict[str, float]:
    return {p.name: (p / MARKER).stat().st_mtime_ns for p in (paths.tokenizer, paths.teacher,
                                                               paths.student)}


def _load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ------------------------------------------------------------------ format and quality
def test_tiny_zoo_is_in_hugging_face_format(tiny_zoo, tiny_cfg):
    from transformers import AutoConfig

    assert (tiny_zoo.tokenizer / "tokenizer.json").is_file()
    assert (tiny_zoo.tokenizer / MARKER).is_file()
    for role, path in (("teacher", tiny_zoo.teacher), ("student", tiny_zoo.student)):
        for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER):
            assert (path / name).is_file(), f"{role}: {name} missing in {path}"
        pickled = [p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        assert pickled == [], f"{role}: pickle files {pickled}"
        # The architecture on disk is the one the config asked for.
        z = getattr(tiny_cfg, role).zoo
        hf = AutoConfig.from_pretrained(str(path))
        assert hf.model_type == "qwen2"
        assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
                hf.num_key_value_heads, hf.intermediate_size) == (
            z.layers, z.hidden, z.heads, z.kv_heads, z.intermediate)
        tok = load_tokenizer(path)
        assert hf.vocab_size == len(tok)
        assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
        info = zoo_info(path)
        assert info["spec"] == model_spec(role, tiny_cfg.task, z, tiny_zoo.tokenizer)
        assert 0.0 <= info["heldout_exact_match"] <= 1.0
        assert 1 <= info["sft_steps"] <= z.sft_steps
    assert zoo_info(tiny_zoo.tokenizer.parent / "no-such-model") is None


def test_teacher_beats_student_and_reported_exact_match_is_real(tiny_zoo, tiny_cfg):
    teacher, student = zoo_info(tiny_zoo.teacher), zoo_info(tiny_zoo.student)
    assert teacher["heldout_exact_match"] >= 0.3
    assert teacher["heldout_exact_match"] > student["heldout_exact_match"]
    # The number in the marker is what the saved weights really score on the held-out set.
    _, heldout = load_splits(tiny_cfg.task)
    for path, info in ((tiny_zoo.teacher, teacher), (tiny_zoo.student, student)):
        em = greedy_exact_match(_load_model(path), load_tokenizer(path), heldout)
        assert em == pytest.approx(info["heldout_exact_match"], abs=1e-9)


# ------------------------------------------------------------------ cache, rebuild
def test_ensure_zoo_reuses_the_cache(tiny_zoo, tiny_cfg, tiny_overrides):
    before = _markers(tiny_zoo)
    listing = sorted(os.listdir(tiny_cfg.zoo_dir))
    again = ensure_zoo(tiny_cfg)
    assert again == tiny_zoo
    assert _markers(again) == before
    assert sorted(os.listdir(tiny_cfg.zoo_dir)) == listing
    # Keys that do not shape the models (sampling, run dir) map to the same artefacts.
    other = load_config([*tiny_overrides, "rollout.temperature=0.5", "steps=3"])
    assert ensure_zoo(other) == tiny_zoo
    assert _markers(tiny_zoo) == before


def test_spec_hash_is_stable_and_sensitive(tiny_cfg, tiny_zoo):
    tok = tiny_zoo.tokenizer
    spec = model_spec("student", tiny_cfg.task, tiny_cfg.student.zoo, tok)
    assert spec_hash(spec) == spec_hash(json.loads(json.dumps(spec)))  # no object identity
    assert spec_hash(spec) == spec_hash(dict(reversed(list(spec.items()))))  # key order
    assert tiny_zoo.student.name == f"addition-student-{spec_hash(spec)}"
    base = spec_hash(spec)
    for change in ({"seed": 7}, {"sft_steps": 5}, {"hidden": 128}, {"lr": 0.01}):
        z = dataclasses.replace(tiny_cfg.student.zoo, **change)
        assert spec_hash(model_spec("student", tiny_cfg.task, z, tok)) != base, change
    task = dataclasses.replace(tiny_cfg.task, seed=tiny_cfg.task.seed + 1)
    assert spec_hash(model_spec("student", task, tiny_cfg.student.zoo, tok)) != base
    # Same recipe, other role: other artefact.
    assert spec_hash(model_spec("teacher", tiny_cfg.task, tiny_cfg.student.zoo, tok)) != base


def test_changing_the_student_recipe_rebuilds_only_the_student(tiny_zoo, tiny_overrides):
    before = _markers(tiny_zoo)
    cfg = load_config([*tiny_overrides, "student.zoo.seed=7", "student.zoo.sft_steps=5",
                       "student.zoo.eval_every=5"])
    expected = Path(cfg.zoo_dir) / ("addition-student-" + spec_hash(
        model_spec("student", cfg.task, cfg.student.zoo, tiny_zoo.tokenizer)))
    # A half-written leftover (no marker) where the new student goes must be replaced by a
    # fresh build, never loaded.
    expected.mkdir(parents=True)
    (expected / "model.safetensors").write_bytes(b"truncated")
    paths = ensure_zoo(cfg)
    assert paths.student == expected != tiny_zoo.student
    assert paths.teacher == tiny_zoo.teacher and paths.tokenizer == tiny_zoo.tokenizer
    assert _markers(tiny_zoo) == before  # the teacher and the old student were not touched
    info = zoo_info(paths.student)
    assert info["spec"]["zoo"]["seed"] == 7 and info["sft_steps"] == 5
    _load_model(paths.student)  # the leftover's bytes are gone: this is a real checkpoint
    leftovers = [p.name for p in Path(cfg.zoo_dir).iterdir() if ".tmp-" in p.name]
    assert leftovers == []


# ------------------------------------------------------------------ layer-dropped students
def test_a_layer_dropped_student_starts_as_the_teachers_kept_layers(tiny_zoo, tiny_overrides):
    """zoo.student_init=teacher with no SFT: the student is the teacher with only layer 1,
    renumbered 0, its embedding and norm; its config has one layer and one layer type; and
    its cache key names the teacher, so a rebuilt teacher rebuilds the student."""
    cfg = load_config([*tiny_overrides, "zoo.student_init=teacher", "zoo.keep_layers=[1]",
                       "student.zoo.sft_steps=0"])
    paths = ensure_zoo(cfg)
    assert paths.teacher == tiny_zoo.teacher and paths.student != tiny_zoo.student
    teacher, student = _tensors(paths.teacher), _tensors(paths.student)
    assert {k for k in student if ".layers." in k} == {
        k.replace("layers.1.", "layers.0.") for k in teacher if ".layers.1." in k}
    for name, tensor in student.items():
        assert torch.equal(tensor, teacher[name.replace("layers.0.", "layers.1.")]), name
    config = json.loads((paths.student / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and len(config.get("layer_types", [None])) == 1
    assert zoo_info(paths.student)["spec"]["init"] == {"teacher": paths.teacher.name, "layers": [1]}
    _load_model(paths.student)  # transformers loads it as it is
    z, tok = cfg.student.zoo, paths.tokenizer
    ours = model_spec("student", cfg.task, z, tok, init=LayerDrop(paths.teacher, (1,)))
    other_teacher = model_spec("student", cfg.task, z, tok,
                               init=LayerDrop(paths.teacher.with_name("another-teacher"), (1,)))
    assert paths.student.name == f"addition-student-{spec_hash(ours)}"
    assert len({spec_hash(ours), spec_hash(other_teacher),
                spec_hash(model_spec("student", cfg.task, z, tok))}) == 3


def test_a_student_for_several_teachers_starts_from_the_one_named_by_zoo_init_teacher(tiny_zoo, tiny_overrides):
    """With `teachers`, zoo.student_init=teacher cuts the student from teachers.<zoo.init_teacher>
    (here the tiny addition teacher, under the name `sums`); without the name it is refused,
    naming the key and the teachers, and a name that is not a teacher is refused by validation."""
    from conftest import TEACHER_ZOO
    from opd.errors import ConfigError

    two = [*tiny_overrides, "zoo.student_init=teacher", "zoo.keep_layers=[1]", "student.zoo.sft_steps=0",
           *(f"+teacher@teachers.{n}=zoo_teacher" for n in ("sums", "other")), "task.default_teacher=sums",
           *(f"teachers.{n}.zoo.{k}={v}" for n in ("sums", "other") for k, v in TEACHER_ZOO.items())]
    paths = ensure_zoo(load_config([*two, "zoo.init_teacher=sums"]))
    teacher, student = _tensors(tiny_zoo.teacher), _tensors(paths.student)
    for name, tensor in student.items():
        assert torch.equal(tensor, teacher[name.replace("layers.0.", "layers.1.")]), name
    assert zoo_info(paths.student)["spec"]["init"] == {"teacher": tiny_zoo.teacher.name, "layers": [1]}
    with pytest.raises(ConfigError, match=r"zoo.init_teacher.*\['other', 'sums'\]"):
        ensure_zoo(load_config(two))
    with pytest.raises(ConfigError, match=r"zoo.init_teacher must be one of teachers \['other', 'sums'\], got 'x'"):
        load_config([*two, "zoo.init_teacher=x"])


# ------------------------------------------------------------------ reproducible builds
def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_a_rebuild_is_bit_identical_and_another_zoo_seed_is_not(tiny_zoo, tiny_cfg, tmp_path):
    """The tiny zoo's student built again in another directory, under another torch thread
    count of the caller, has the same tensors bit for bit and the same marker checksum;
    zoo.seed=1 builds other weights with another checksum."""
    torch.set_num_threads(1)  # the build fixes its own thread count
    try:
        again = ensure_model("student", tmp_path / "a", tiny_cfg.task, tiny_cfg.student.zoo,
                             tiny_zoo.tokenizer)
        other = ensure_model("student", tmp_path / "b", tiny_cfg.task, tiny_cfg.student.zoo,
                             tiny_zoo.tokenizer, zoo_seed=1)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    first, second = _tensors(tiny_zoo.student), _tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    checksum = zoo_info(tiny_zoo.student)["weights_sha256"]
    assert checksum == zoo_info(again)["weights_sha256"] == weights_sha256(again)
    assert zoo_info(other)["weights_sha256"] != checksum
    assert not all(torch.equal(first[k], _tensors(other)[k]) for k in first)
    assert zoo_info(other)["spec"]["zoo_seed"] == 1


# ------------------------------------------------------------------ atomic writes
def _temps(parent: Path, final: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{final.name}.tmp-")]


def test_atomic_build_killed_halfway_leaves_nothing(tmp_path):
    final = tmp_path / "zoo" / "addition-student-abc"

    def crash(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of SFT looks like

    with pytest.raises(KeyboardInterrupt):
        atomic_build(final, crash)
    assert not final.exists()
    assert _temps(final.parent, final) == []

    calls = []

    def good(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / MARKER).write_text("{}")

    assert atomic_build(final, good) == final
    assert (final / "model.safetensors").read_bytes() == b"weights"
    assert calls[0] != final and _temps(final.parent, final) == []
    # A finished artefact is reused: the builder is not called again.
    assert atomic_build(final, good) == final and len(calls) == 1


def test_atomic_build_replaces_a_leftover_without_marker(tmp_path):
    final = tmp_path / "addition-teacher-abc"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"partial")
    (final / "junk.txt").write_text("from a killed run")

    def good(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"fresh")
        (tmp / MARKER).write_text("{}")

    atomic_build(final, good)
    assert sorted(p.name for p in final.iterdir()) == sorted(["model.safetensors", MARKER])
    assert (final / "model.safetensors").read_bytes() == b"fresh"
    assert _temps(tmp_path, final) == []


# ------------------------------------------------------------------ vLLM parity
@pytest.fixture
def worker(student_engine):
    return student_engine  # the session's engine on the zoo student


@pytest.fixture(scope="module")
def heldout(tiny_cfg):
    return load_splits(tiny_cfg.task)[1]


# Raw-text prompts (no chat template) that the addition-trained student has never seen.
ODD_PROMPTS = [Example(None, text, None, f"odd:{i}")
               for i, text in enumerate(["hello world", "9+9=", "(a)", "1+1+1"])]


def _sampling(temperature: float, n: int, seed: int):
    from opd.types import SamplingSettings

    return SamplingSettings(max_new_tokens=8, temperature=temperature, top_p=1.0, top_k=-1,
                            repetition_penalty=1.0, stop=(), stop_token_ids=(), seed=seed, n=n)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_sampled_logprobs_match_transformers(worker, tiny_zoo, heldout, temperature):
    """The worker returns log-probs of the distribution it sampled from: log_softmax(logits/T)
    of the same fp32 weights, recomputed by a transformers forward pass."""
    from opd.tasks import prompt_batch

    tok = load_tokenizer(tiny_zoo.student)
    exs = heldout[:6] + ODD_PROMPTS[:2]
    prompts = prompt_batch(tok, exs)
    batch = worker.generate(prompts, _sampling(temperature, n=3, seed=11))
    assert len(batch.completion_ids) == len(exs) * 3
    model = _load_model(tiny_zoo.student)
    worst, n_tokens = 0.0, 0
    for i, (p, c, lp) in enumerate(zip(batch.prompt_ids, batch.completion_ids,
                                       batch.sampler_logprobs)):
        assert p == prompts.prompt_ids[i // 3]
        assert len(c) == len(lp) >= 1
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1: -1]
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(lp)).abs().max().item())
        n_tokens += len(c)
    assert worst <= 1e-4, f"max |vLLM - transformers| log-prob = {worst:.2e} over {n_tokens} tokens"
    assert n_tokens >= len(exs) * 3 * 2  # every completion has at least a token and EOS


@pytest.mark.slow
def test_vllm_greedy_matches_transformers_greedy(worker, tiny_zoo, tiny_cfg, heldout):
    tok = load_tokenizer(tiny_zoo.student)
    train = load_splits(tiny_cfg.task)[0]
    reversal = build_task("reversal", seed=1, train_size=1, heldout_size=10).heldout()
    exs = list(heldout) + train[:20] + reversal + ODD_PROMPTS
    prompt_ids = [encode_prompt(tok, ex) for ex in exs]
    texts = worker.greedy(prompt_ids, max_new_tokens=8)
    # The weak student answers most sums alike; the other prompts make it stop at once or run
    # to the token limit: without some variety this comparison would prove little.
    assert len(set(texts)) >= 3
    model = _load_model(tiny_zoo.student)
    ref = []
    for p in prompt_ids:
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        ref.append(tok.decode(out[0, len(p):], skip_special_tokens=True))
    assert texts == ref
    # The zoo's batched, left-padded evaluation agrees with the engine's greedy texts.
    em_vllm = sum(exact_match(t, ex.answer) for t, ex in zip(texts, heldout)) / len(heldout)
    assert greedy_exact_match(model, tok, heldout, max_new_tokens=8) == pytest.approx(em_vllm)
