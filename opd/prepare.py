"""`opd-prepare`: build (or reuse) the offline model zoo for a task and report accuracies.

    opd-prepare                      # the default task (conf/train.yaml)
    opd-prepare task=reversal        # any override of the train config

Prints the held-out exact match of the teacher and the student (greedy decoding).
"""

from __future__ import annotations

import sys
import time

from opd.config import load_config
from opd.zoo import ensure_zoo, zoo_info


def report(paths) -> str:
    rows = [("teacher", paths.teacher), ("student", paths.student)]
    lines = [f"{'model':8s} {'held-out exact match':>21s} {'SFT steps':>10s}  path"]
    for name, path in rows:
        info = zoo_info(path) or {}
        lines.append(f"{name:8s} {info.get('heldout_exact_match', float('nan')):21.3f} "
                     f"{info.get('sft_steps', 0):10d}  {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    paths = ensure_zoo(cfg)
    print(report(paths))
    print(f"prepare: {time.time() - t0:.1f}s (zoo: {cfg.zoo_dir})", flush=True)


if __name__ == "__main__":
    main()
