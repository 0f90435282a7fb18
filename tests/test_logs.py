"""Where actor and engine output goes: each Ray actor's stdout/stderr (file descriptors, so
C++ output too) into <run_dir>/logs/<name>.log unless log_level=debug, and Ray started
without forwarding worker logs to the driver."""

import subprocess
import sys
import textwrap
import types

from opd import actors


def test_actor_output_goes_to_its_log_file(tmp_path):
    """The wrapper Ray instantiates redirects before the wrapped constructor runs; run in a
    child process because it rewires file descriptors 1 and 2."""
    log = tmp_path / "logs" / "rollout-0.log"
    code = textwrap.dedent(f"""
        import os
        from opd.actors import _in_actor

        class Engine:
            def __init__(self, x):
                print("engine banner", x, flush=True)
                os.write(2, b"native stderr\\n")

        wrapped = _in_actor(Engine, {str(log)!r})
        assert wrapped.__name__ == "Engine" and issubclass(wrapped, Engine)
        wrapped(7)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "engine banner" not in out.stdout + out.stderr
    assert log.read_text() == "engine banner 7\nnative stderr\n"


def test_ray_forwards_worker_logs_only_in_debug(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = types.SimpleNamespace(ray_num_cpus=1)
    assert actors.start_ray(res) is True
    assert actors.start_ray(res, debug=True) is True
    assert [c["log_to_driver"] for c in calls] == [False, True]
    assert calls[0]["address"] == "local"  # never joins a cluster `ray start` left behind
    assert calls[0]["logging_level"] > calls[1]["logging_level"]  # WARNING vs INFO banners
