"""Device resolution shared by the learner and the teacher: "auto" means CUDA when present."""

from __future__ import annotations

import torch


def pick_device(device: str) -> str:
    """"auto" -> "cuda" if torch sees a GPU, else "cpu"; "cpu" / "cuda" as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
