"""What a run prints: one progress bar, notes above it, and quiet libraries.

On a terminal, `Console` draws one tqdm bar for the whole run (step, ETA, teacher KL, mean
length, truncation, loss); notes (length-monitor events, evaluations) are written above it.
When stdout is not a terminal (CI, pipes, `ray job logs`), the bar becomes one compact line
every `log_every` steps: no carriage returns in log files.

`quiet_libraries` keeps vLLM's and Ray's start-up banners out of the console, and
`filter_benign_vllm_warnings` drops the warnings we know to be harmless.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from typing import Optional, TextIO

# Shown on the bar: (metric name, label, format)
BAR_KEYS = (("teacher/kl", "kl", "+.3f"), ("length/mean", "len", ".1f"),
            ("length/truncated_frac", "trunc", ".2f"), ("loss/rows_total", "loss", "+.4f"))


# The line without a bar: (metric name, label, format, value when missing), by kind of step
LINE_ON_POLICY = (("length/mean", "len", "5.1f", 0.0), ("length/truncated_frac", "trunc", ".2f", 0.0),
                  ("teacher/kl", "kl", "+.3f", math.nan), ("rollout/tokens_per_s", "tok/s", "6.0f", 0.0))
LINE_OFF_POLICY = (("rollout/tokens", "off-policy SFT tokens", ".0f", 0.0), ("offpolicy/mean", "len", "4.1f", 0.0))
LINE_TAIL = (("loss/rows_total", "loss", "+.4f", 0.0), ("optim/grad_norm", "gnorm", ".3f", 0.0),
             ("optim/lr", "lr", ".2e", 0.0))


def console_line(step: int, steps: int, v: dict) -> str:
    """The compact one-line summary of a step (non-TTY output)."""
    keys = LINE_ON_POLICY if v.get("rollout/on_policy", 1.0) else LINE_OFF_POLICY
    cells = [f"{label} {v.get(k, missing):{fmt}}" for k, label, fmt, missing in keys + LINE_TAIL]
    return "  ".join([f"step {step:4d}/{steps}", *cells, f"{v.get('time/step', 0.0):.2f}s"])


def bar_postfix(values: dict) -> str:
    """The key numbers after the bar, e.g. `kl +0.512 len 6.1 trunc 0.00 loss +0.0123`."""
    return " ".join(f"{label} {values[k]:{fmt}}" for k, label, fmt in BAR_KEYS if k in values)


class Console:
    """One progress bar for the run (TTY), or a compact line every `log_every` steps."""

    def __init__(self, total_steps: int, log_every: int = 1, start_step: int = 0,
                 bar: Optional[bool] = None, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout
        self.total, self.log_every = total_steps, max(1, log_every)
        self.bar = None
        if self.stream.isatty() if bar is None else bar:
            from tqdm import tqdm

            known = _columns(self.stream) > 0  # 0 on a pty without a size: tqdm would draw nothing
            size = {} if known else {"ncols": 120, "nrows": 20}
            self.bar = tqdm(total=total_steps, initial=start_step, desc="distill", unit="step",
                            file=self.stream, dynamic_ncols=known, **size)

    def step(self, step: int, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(bar_postfix(values), refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.log_every == 0 or step == self.total:
            self._print(console_line(step, self.total, values))

    def note(self, text: str) -> None:
        """A line above the bar (or a plain line without one)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self._print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


# ------------------------------------------------------------------ library output
# vLLM's layerwise reload warns "<Layer>: Failed to load weights" for layers whose weights
# are not in the update: the rotary embedding (no weights at all) and the tied LM head (the
# embedding is synced and WeightSyncExtension._opd_refresh_tied_head repoints the head).
# Both are harmless and printed 4 lines per weight sync.
BENIGN_VLLM = re.compile(r"^(RotaryEmbedding|ParallelLMHead): Failed to load weights$")


class BenignWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not BENIGN_VLLM.match(record.getMessage())


def filter_benign_vllm_warnings() -> None:
    """Attach the filter to vLLM's handlers (its child loggers propagate to them). A no-op
    until vLLM is imported; idempotent."""
    if "vllm" not in sys.modules:
        return
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, BenignWarnings) for f in handler.filters):
            handler.addFilter(BenignWarnings())


def quiet_libraries(debug: bool) -> None:
    """Before vLLM is imported: engine logs at WARNING unless `log_level=debug`."""
    if not debug:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and child
    output too) to `path`, appended. Used by each Ray actor at construction."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
