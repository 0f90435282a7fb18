"""Tests of opd/config.py and conf/: every YAML composes, validates and reaches the
dataclasses; every kind of rule refuses a bad value with the key's full name and the allowed
range; wrong types and unknown keys are refused at compose time."""
import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from opd.config import CONF_DIR, ConfigError, RolloutConfig, TrainConfig, load_config, validate

GROUPS = ["task", "student", "teacher", "rollout", "loss", "optim", "length", "resources", "zoo",
          "format", "early_stop"]
GROUP_FILES = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# task=file refuses to run without a train file (a cross check): give it one.
EXTRA = {("task", "file"): ["task.train_file=/tmp/prompts.jsonl"]}


def test_every_group_directory_is_covered():
    on_disk = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    assert on_disk == sorted(GROUPS + ["experiment"])
    assert len(GROUP_FILES) >= 16


def test_root_config_alone_composes_and_validates():
    cfg = load_config([])
    assert isinstance(cfg, TrainConfig)
    root = OmegaConf.load(CONF_DIR / "train.yaml")
    for key in ("seed", "steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
        assert getattr(cfg, key) == root[key], key
    assert cfg.task.name == "addition" and cfg.loss.distill == "jsd"  # the default experiment is GKD
    assert cfg.run_dir.startswith("runs/addition-")  # ${now:...} resolved
    assert validate(cfg) is cfg


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _leaves(node: dict, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_every_yaml_composes_validates_and_is_used(group, name):
    cfg = load_config([f"{group}={name}", *EXTRA.get((group, name), [])])
    assert isinstance(cfg, TrainConfig)
    # Every value the file sets itself (over the files it inherits from) reaches the dataclass.
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    own.pop("defaults", None)
    leaves = list(_leaves(own))
    assert leaves, f"{group}/{name}.yaml sets nothing"
    overridden = {o.split("=")[0] for o in EXTRA.get((group, name), [])}
    for key, value in leaves:
        if f"{group}.{key}" in overridden:
            continue
        assert _get(cfg, f"{group}.{key}") == value, f"{group}.{key}"


def test_group_files_differ_where_they_say():
    assert load_config(["loss=gkd"]).loss.distill == "jsd"
    seqkd = load_config(["loss=seqkd"]).loss
    assert (seqkd.distill, seqkd.on_policy_fraction, seqkd.sft_coef) == ("none", 0.0, 1.0)
    smpo_only = load_config(["loss=smpo_only"]).loss
    assert smpo_only.smpo.pair_score == "checker" and smpo_only.smpo.beta == 1.2  # inherited
    assert load_config(["length=off"]).length.mode == "off"  # the string, not YAML's False
    assert load_config(["resources=gpu"]).resources.rollout_num_gpus == 1


def test_rules_reach_the_nested_length_configs():
    with pytest.raises(ConfigError, match=r"length\.detector\.k_on must be >= 1, got 0"):
        load_config(["length.detector.k_on=0"])
    with pytest.raises(ConfigError, match=r"length\.stats\.tail_window must be >= 2 \* length\.stats\.ngram"):
        load_config(["length.stats.ngram=20"])


# ------------------------------------------------------------------ bad values
BAD = [
    # (overrides, exact text expected in the message)
    (["rollout.temperature=-1"], "rollout.temperature must be > 0, got -1.0"),  # _gt
    (["rollout.temperature=0"], "rollout.temperature must be > 0, got 0.0"),
    (["rollout.top_p=0"], "rollout.top_p must be in (0, 1], got 0.0"),  # _range, open low end
    (["rollout.top_p=1.01"], "rollout.top_p must be in (0, 1], got 1.01"),
    (["rollout.overlap_tis_cap=0.5"], "rollout.overlap_tis_cap must be >= 1, got 0.5"),
    (["rollout.overlap=true", "loss=seqkd"], "rollout.overlap needs loss.on_policy_fraction=1"),
    (["resources.learner_workers=2", "resources.use_ray=false"],
     "resources.learner_workers > 1 (a sharded learner, got 2) needs resources.use_ray=true"),
    (["resources.learner_workers=0"], "resources.learner_workers must be >= 1, got 0"),
    (["resources.teacher_workers=0"], "resources.teacher_workers must be >= 1, got 0"),
    (["resources.learner_placement=RANDOM"],
     "resources.learner_placement must be one of ['PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'], got 'RANDOM'"),
    (["student.lora.r=0"], "student.lora.r must be >= 1, got 0"),
    (["student.lora.dropout=1"], "student.lora.dropout must be in [0, 1), got 1.0"),
    (["student.lora.target_modules=[]"], "student.lora.target_modules must name at least one module, got []"),
    (["student.lora.sync=lazy"], "student.lora.sync must be one of ['merged', 'adapter'], got 'lazy'"),
    (["student.lora.enabled=true", "student.lora.sync=adapter", "student.lora.trainable_modules=[lm_head]"],
     "student.lora.sync=adapter sends the adapters alone, so student.lora.trainable_modules must be empty"),
    (["student.lora.enabled=true", "student.lora.sync=adapter", "student.lora.r=1024"],
     "student.lora.r must be <= 512 with student.lora.sync=adapter"),
    (["loss.jsd_beta=1.5"], "loss.jsd_beta must be in [0, 1], got 1.5"),  # _range, closed
    (["loss.jsd_beta=-0.1"], "loss.jsd_beta must be in [0, 1], got -0.1"),
    (["optim.beta2=1.0"], "optim.beta2 must be in [0, 1), got 1.0"),  # open high end
    (["task.max_digits=0"], "task.max_digits must be in [1, 9], got 0"),
    (["task.name=bogus"], "task.name must be one of ['addition', 'reversal', 'arith_chat', 'mixed', 'file'], got 'bogus'"),
    (["length.mode=loud"], "length.mode must be one of ['off', 'monitor', 'auto'], got 'loud'"),
    (["teacher.logprobs=all"], "teacher.logprobs must be one of ['sampled', 'topk', 'full'], got 'all'"),
    (["rollout.dtype=float64"], "rollout.dtype must be one of ['float32', 'bfloat16', 'float16'], got 'float64'"),
    (["loss.smpo.loss_type=dpo"], "loss.smpo.loss_type must be one of ['smooth_lower_bound', 'sigmoid', 'hinge', 'ipo'], got 'dpo'"),
    (["task.train_size=0"], "task.train_size must be >= 1, got 0"),  # _ge
    (["student.zoo.heads=0"], "student.zoo.heads must be >= 1, got 0"),
    (["teacher.zoo.sft_steps=-1"], "teacher.zoo.sft_steps must be >= 0, got -1"),
    (["optim.micro_batch_size=0"], "optim.micro_batch_size must be >= 1, got 0"),
    (["keep_checkpoints=0"], "keep_checkpoints must be >= 1, got 0"),
    (["resources.rollout_num_cpus=0"], "resources.rollout_num_cpus must be > 0, got 0.0"),
    (["loss.clip_eps_low=1.0"], "loss.clip_eps_low must be in [0, 1) or null, got 1.0"),  # _opt
    (["loss.tis_cap=0"], "loss.tis_cap must be > 0 or null, got 0.0"),
    (["resources.ray_num_cpus=0"], "resources.ray_num_cpus must be >= 1 or null, got 0"),
    (["loss.smpo.min_log_prob=0.5"], "loss.smpo.min_log_prob must be < 0 or null, got 0.5"),
    (["loss.smpo.chosen_upper_percentile=0"],
     "loss.smpo.chosen_upper_percentile must be in (0, 1] or null, got 0.0"),
    (["loss.smpo.prefer_bad_rejected=yes"],
     "loss.smpo.prefer_bad_rejected must be one of ['auto', 'always', 'never'], got 'yes'"),
    # cross checks (_cross_checks): each message names both keys
    (["rollout.max_new_tokens=100", "rollout.max_model_len=64"],
     "rollout.max_new_tokens must be < rollout.max_model_len (64), got 100"),
    (["rollout.max_new_tokens=64", "rollout.max_model_len=64"],
     "rollout.max_new_tokens must be < rollout.max_model_len (64), got 64"),
    (["task.min_chars=7", "task.max_chars=5"], "task.min_chars must be <= task.max_chars (5), got 7"),
    (["task=file"], "task.train_file must be set when task.name is 'file', got null"),
    (["length.penalties.overlong_buffer=17"],
     "length.penalties.overlong_buffer must be <= rollout.max_new_tokens (16), got 17"),
    (["length.detector.trunc_off=0.5", "length.detector.trunc_on=0.2"],
     "length.detector.trunc_off must be <= length.detector.trunc_on (0.2), got 0.5"),
    (["length.detector.rep_off=0.3", "length.detector.rep_on=0.2"],
     "length.detector.rep_off must be <= length.detector.rep_on (0.2), got 0.3"),
    (["length.detector.short_off=0.4"], "length.detector.short_off must be <= length.detector.short_on (0.3), got 0.4"),
    (["length.detector.ratio_off=2.0"], "length.detector.ratio_off must be <= length.detector.ratio_on (1.5), got 2.0"),
    (["length.detector.eos_on=0.8"], "length.detector.eos_on must be <= length.detector.eos_off (0.7), got 0.8"),
    (["student.zoo.heads=3"], "student.zoo.hidden must be divisible by student.zoo.heads and heads "
                              "by kv_heads, got hidden=128 heads=3 kv_heads=2"),
    (["teacher.zoo.kv_heads=3"], "teacher.zoo.hidden must be divisible by teacher.zoo.heads and "
                                 "heads by kv_heads, got hidden=256 heads=4 kv_heads=3"),
    (["loss=seqkd", "loss.sft_coef=0"], "loss: every term is off (loss.distill=none, "
                                         "loss.smpo_coef=0, loss.sft_coef=0)"),
    (["task.answer_extraction=first"], "task.answer_extraction must be 'exact', 'last_number' or "
                                       "'regex:<pattern>' (a valid regex), got 'first'"),
    (["task.answer_extraction='regex:('"], "task.answer_extraction must be 'exact'"),
    (["length.remedies.mixture_fraction=1.5"], "length.remedies.mixture_fraction must be in [0, 1], got 1.5"),
    (["zoo.name=hub"], "zoo.name must be one of ['toy', 'smollm2'], got 'hub'"),
    (["teacher.logprobs=sampled"], "length.remedies.topk_kl_coef > 0 (the top-k KL length remedy) needs "
                                   "teacher.logprobs=topk or full, got sampled"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_refused_with_key_and_range(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert message in str(e.value)


def test_all_violations_are_listed_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(["rollout.temperature=-1", "loss.jsd_beta=2", "optim.lr=0"])
    msg = str(e.value)
    for key in ("rollout.temperature", "loss.jsd_beta", "optim.lr"):
        assert f"\n  {key} must be" in msg


def test_validate_checks_a_hand_built_config():
    import dataclasses

    cfg = load_config([])
    bad = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, top_k=5, top_p=0.0))
    with pytest.raises(ConfigError, match=r"rollout\.top_p must be in \(0, 1\], got 0\.0"):
        validate(bad)


# ------------------------------------------------------------------ compose-time refusals
@pytest.mark.parametrize("override,key", [
    ("rollout.temperature=hot", "rollout.temperature"),  # not a float
    ("task.train_size=1.5", "task.train_size"),  # not an int
    ("resources.use_ray=maybe", "resources.use_ray"),  # not a bool
    ("rollout.stop=abc", "rollout.stop"),  # not a list
    ("rollout.bogus=1", "rollout.bogus"),  # unknown key
    ("loss.smpo.betta=1", "loss.smpo.betta"),
    ("bogus=1", "bogus"),
])
def test_wrong_type_or_unknown_key_is_refused_at_compose_time(override, key):
    with pytest.raises(HydraException) as e:
        load_config([override])
    assert key in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("+rollout.bogus=1", "rollout.bogus"),
    ("+rollout.temprature=0.5", "rollout.temprature"),
    ("+loss.smpo.betta=1", "loss.smpo.betta"),
    ("+bogus=1", "bogus"),
])
def test_appended_unknown_key_is_refused(override, key):
    """Hydra lets `+key=value` into a structured config; validation must still refuse it
    (a typo would otherwise be silently ignored)."""
    with pytest.raises(ConfigError, match=rf"(?m)^  {key} is not a config key"):
        load_config([override])


def test_unknown_group_option_is_refused():
    with pytest.raises(HydraException, match="loss/bogus"):
        load_config(["loss=bogus"])


def test_overrides_reach_the_dataclass_with_their_types():
    cfg = load_config(["rollout.temperature=0.5", "task=reversal", "loss.tis_cap=2",
                       "rollout.stop=[ab,cd]", "resources.ray_num_cpus=2"])
    assert cfg.rollout.temperature == 0.5 and cfg.task.name == "reversal"
    assert isinstance(cfg.loss.tis_cap, float) and cfg.loss.tis_cap == 2.0
    assert cfg.rollout.stop == ["ab", "cd"] and cfg.resources.ray_num_cpus == 2
    assert isinstance(cfg.rollout, RolloutConfig)


def test_gpu_experiment_composes_with_real_model_ids():
    cfg = load_config(["experiment=qwen_gpu", "task.train_file=/tmp/prompts.jsonl"])
    assert cfg.student.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.teacher.path == "Qwen/Qwen2.5-7B-Instruct"
    assert (cfg.task.name, cfg.loss.distill, cfg.teacher.backend) == ("file", "reverse_kl_pg", "vllm")
    assert cfg.resources.rollout_num_gpus == 1 and cfg.rollout.dtype == "bfloat16"
    assert cfg.run_dir.startswith("runs/qwen-") and cfg.steps == 200  # the experiment wins over train.yaml
    with pytest.raises(ConfigError, match="task.train_file must be set"):
        load_config(["experiment=qwen_gpu"])
