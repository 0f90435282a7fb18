"""LoRA students (`student.lora.enabled`): low-rank adapters trained through peft on a frozen
student.

    peft = wrap(model, cfg.student.lora)          # adapters injected into `model` in place
    anchor = Base(whole, peft)                    # the starting student: the adapters off
    merged(full_weights(model), scale(cfg))       # Hugging Face names, the adapters folded in

- `wrap` injects the adapters into the Hugging Face model itself, so the learner's forward
  (`opd.learner.forward`: the decoder, then the chunked LM head) and every loss term run on
  it unchanged. Only the adapters (and `trainable_modules`, trained in full) require grad;
  AdamW holds state for them alone.
- The divergence anchor needs no frozen copy: the starting student is the base with the
  adapters disabled (`Base`).
- The engines get the merged weights, W + (alpha / r) B A, under the model's own names
  (`merged`), or the adapters alone in peft's format (`adapter_update`), per
  `student.lora.sync`.
- Checkpoints hold both: the merged model (what transformers and vLLM load) and the adapter
  in peft's format in `<ckpt>/adapter/` (`PeftModel.from_pretrained`), from which a resumed
  learner continues on the same base (`saved_adapter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from opd.config import LoraConfig

ADAPTER = "default"  # peft's name of the one adapter
ADAPTER_DIR = "adapter"  # a checkpoint's adapter, in peft's format
TARGETS_KEY = "student.lora.target_modules"


def module_names(model: torch.nn.Module, kind: type = torch.nn.Linear) -> list[str]:
    """The names (last part) of the model's modules of a kind: its linear layers are what
    `target_modules` may name."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kind)})


def target_problem(model: torch.nn.Module, targets: list[str], key: str = TARGETS_KEY,
                   kind: type = torch.nn.Linear) -> Optional[str]:
    """Why `targets` do not fit the model (a name that matches no module of the kind), or None."""
    names = module_names(model, kind)
    missing = [t for t in targets if t not in names]
    if missing:
        what = "linear layer" if kind is torch.nn.Linear else "module"
        return f"{key}: {missing} match no {what} of the student; it has {names}"
    return None


def check_targets(model_path: str, cfg: Any) -> Optional[str]:
    """`target_problem` for the student at `model_path` (`cfg`: the student's config), built on
    the meta device: nothing is loaded. None when LoRA is off."""
    if not cfg.lora.enabled:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    tied = [m for m in cfg.lora.trainable_modules if m in ("lm_head", "embed_tokens")]
    if tied and getattr(config, "tie_word_embeddings", False):
        return (f"student.lora.trainable_modules: {tied} share one matrix in this student (tie_word_embeddings), "
                f"which a copy trained beside the adapters would split; leave them out, or train in full "
                f"(student.lora.enabled=false)")
    return (target_problem(model, cfg.lora.target_modules)
            or target_problem(model, cfg.lora.trainable_modules, "student.lora.trainable_modules", torch.nn.Module))


def peft_config(cfg: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                          target_modules=list(cfg.target_modules),
                          modules_to_save=list(cfg.trainable_modules) or None)


def wrap(model: torch.nn.Module, cfg: LoraConfig, adapter_dir: Optional[Path] = None) -> Any:
    """The peft model around `model`, whose layers get the adapters in place: new ones (B = 0,
    so the student starts unchanged), or those saved at `adapter_dir` (trainable)."""
    from peft import PeftModel, get_peft_model

    problem = target_problem(model, cfg.target_modules)
    if problem:
        raise ValueError(problem)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return get_peft_model(model, peft_config(cfg))


def saved_adapter(model_path: str, start_path: str) -> Optional[Path]:
    """The adapter to continue from: a checkpoint's (`model_path`, resuming on the base at
    `start_path`), or None for new adapters (a run that starts from a merged model)."""
    d = Path(model_path) / ADAPTER_DIR
    return d if model_path != start_path and (d / "adapter_config.json").is_file() else None


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.r


def merged(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict (peft's layer names inside the Hugging Face model) as the
    plain model's: each adapted weight W + scaling * B @ A, fully trained modules under their
    own names. B may be a dim-0 shard of B (with W's matching rows): A must be whole."""
    out = {}
    for k, v in sd.items():
        if ".lora_" in k or ".original_module." in k:
            continue
        if ".base_layer." in k:
            stem, leaf = k.split(".base_layer.")
            if leaf == "weight":
                a, b = sd[f"{stem}.lora_A.{ADAPTER}.weight"], sd[f"{stem}.lora_B.{ADAPTER}.weight"]
                v = v + scaling * (b.to(v.dtype) @ a.to(v.dtype))
            out[f"{stem}.{leaf}"] = v
        else:
            out[k.replace(f".modules_to_save.{ADAPTER}.", ".")] = v
    return out


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def peft_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hugging Face model's state dict under the peft model's names (`base_model.model.<name>`)."""
    return {f"base_model.model.{k}": v for k, v in sd.items()}


def adapter_state(peft_model: Any, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of the Hugging Face model's state dict `sd`, under the names
    peft saves them by (what vLLM's LoRA loader reads)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=peft_names(sd))


def adapter_config(peft_model: Any) -> dict:
    """The adapter's config as peft writes it (adapter_config.json)."""
    import json

    return json.loads(json.dumps(peft_model.peft_config[ADAPTER].to_dict(), default=sorted))


def is_adapter_a(name: str) -> bool:
    """An adapter's A: the merge needs it whole on every rank."""
    return f".lora_A.{ADAPTER}." in name


def save_adapter(peft_model: Any, directory: Path, sd: dict[str, torch.Tensor]) -> None:
    """The adapter in peft's format (adapter_config.json + adapter_model.safetensors), from
    the Hugging Face model's gathered state dict `sd` (peft picks the adapter's tensors)."""
    peft_model.save_pretrained(str(directory), state_dict=peft_names(sd),
                               safe_serialization=True)


def counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters (whole tensors, also when sharded)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params)}


class Base:
    """The run's starting student: the LoRA student with its adapters off, called as a
    `shard.Whole` is. The LM head it hands out keeps them off whenever it runs (the chunked
    head runs after the decoder's call returns)."""

    def __init__(self, student: Callable, peft_model: Any):
        self.student, self.peft = student, peft_model

    def __call__(self, fn: Callable) -> Any:
        with self.peft.disable_adapter():
            hidden, head = self.student(fn)

        def head_off(x: torch.Tensor) -> torch.Tensor:
            with self.peft.disable_adapter():
                return head(x)

        return hidden, head_off
