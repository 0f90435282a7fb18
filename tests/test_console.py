"""The console: a bar on a terminal, one compact line every `log_every` steps elsewhere,
notes above the bar, and vLLM's known-benign warnings filtered."""

import io
import logging

from opd.console import BenignWarnings, Console, bar_postfix, console_line

VALUES = {"teacher/kl": 0.5123, "length/mean": 6.25, "length/truncated_frac": 0.125,
          "loss/rows_total": -0.0321, "time/step": 1.5}


def test_not_a_tty_prints_one_line_every_log_every_steps():
    out = io.StringIO()  # isatty() is False, like a pipe or CI
    con = Console(total_steps=7, log_every=3, stream=out)
    for step in range(1, 8):
        con.step(step, VALUES)
    con.note("length monitor: step 4 truncation -> on (ema 0.4)")
    con.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # steps 3 and 6, the last step (7), then the note
    assert [l.split("/")[0] for l in lines[:3]] == ["step    3", "step    6", "step    7"]
    assert lines[0] == console_line(3, 7, VALUES)
    assert lines[3] == "length monitor: step 4 truncation -> on (ema 0.4)"
    assert len(lines) == 4


def test_bar_shows_key_numbers_and_notes_go_above_it():
    out = io.StringIO()
    con = Console(total_steps=4, log_every=1, bar=True, stream=out)
    con.step(1, VALUES)
    con.note("step 1: held-out exact match 0.250")
    con.step(2, VALUES)
    con.close()
    text = out.getvalue()
    assert "step 1: held-out exact match 0.250\n" in text
    assert "kl +0.512 len 6.2 trunc 0.12 loss -0.0321" in text
    assert "2/4" in text  # the bar's count
    assert "step    1/4" not in text  # no per-step lines next to a bar


def test_bar_postfix_skips_missing_numbers():
    assert bar_postfix({"loss/rows_total": 0.5}) == "loss +0.5000"


def test_benign_vllm_warnings_are_dropped_and_others_kept():
    f = BenignWarnings()

    def record(msg, *args):
        return logging.LogRecord("vllm.model_executor", logging.WARNING, "x.py", 1, msg, args, None)

    assert not f.filter(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not f.filter(record("%s: Failed to load weights", "ParallelLMHead"))
    assert f.filter(record("%s: Failed to load weights", "Qwen2Attention"))  # a real problem
    assert f.filter(record("CPU KV cache size: 16,384 tokens"))


def test_filter_is_attached_to_vllm_handlers_and_sees_child_loggers(monkeypatch):
    import sys
    import types

    from opd.console import filter_benign_vllm_warnings

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger("vllm")
    monkeypatch.setitem(sys.modules, "vllm", sys.modules.get("vllm", types.ModuleType("vllm")))
    root.addHandler(handler)
    try:
        filter_benign_vllm_warnings()
        filter_benign_vllm_warnings()  # idempotent
        assert sum(isinstance(f, BenignWarnings) for f in handler.filters) == 1
        child = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        child.warning("%s: Failed to load weights", "RotaryEmbedding")
        child.warning("something else")
    finally:
        root.removeHandler(handler)
    assert out.getvalue() == "something else\n"
