"""Layer-dropped students: a copy of a teacher with only some of its decoder layers, the
DistilBERT / DistilGPT2 / Minitron way of building a student that starts from the teacher's
own representation. Both zoos build their students this way (the toy zoo then heals the copy
by SFT up to a weak start; opd/zoo/toy.py).

    layers = kept_layers(n_layers, keep=[], every=3)   # 0, 3, 6, ...
    student = drop_layers(teacher_model, layers)       # renumbered 0..len(layers)-1
"""

from __future__ import annotations

import re
from typing import Sequence


def kept_layers(n_layers: int, keep: Sequence[int], every: int) -> list[int]:
    """The teacher layers the student keeps: `keep` if given, else 0, every, 2*every, ..."""
    layers = sorted(set(keep)) if keep else list(range(0, n_layers, every))
    if not layers or layers[-1] >= n_layers:
        raise ValueError(f"zoo.keep_layers must be indices in [0, {n_layers}), got {list(keep)}")
    return layers


def plain_model(config, state_dict):
    """A model that save_pretrained accepts, holding `state_dict` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config.__class__.from_dict({k: v for k, v in config.to_dict().items()
                                         if k != "quantization_config"})
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def drop_layers(model, keep: Sequence[int]):
    """A copy of `model` with only the decoder layers `keep` (renumbered 0..len(keep)-1)."""
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        m = _LAYER.match(name)
        if m is None:
            state[name] = tensor
        elif int(m.group(1)) in new_index:
            state[_LAYER.sub(f"model.layers.{new_index[int(m.group(1))]}.", name)] = tensor
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (Qwen2): keep theirs
        config.layer_types = [config.layer_types[i] for i in keep]
    return plain_model(config, state)
