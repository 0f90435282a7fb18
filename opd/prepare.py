"""`opd-prepare`: build (or reuse) the offline model zoo for a task and report accuracies.

    opd-prepare                      # the default task (conf/train.yaml), toy zoo
    opd-prepare task=reversal        # any override of the train config
    opd-prepare zoo=smollm2          # the real pair: SmolLM2-135M-Instruct + a layer-dropped student
    opd-prepare experiment=toy_two_teachers   # a mixed-task student and a teacher per task

Prints the held-out exact match of the toy teacher and student (greedy decoding), or the
real pair's paths and sizes.
"""

from __future__ import annotations

import sys
import time

from opd.config import load_config
from opd.errors import exit_on_user_error
from opd.zoo import ensure_zoo, teacher_paths, zoo_info


def report(paths, teachers: dict | None = None) -> str:
    """One line per model: its held-out exact match and SFT steps (the toy zoo's), its path.
    `teachers`: several teachers' paths by name (else the zoo's one teacher)."""
    rows = list((teachers or {"teacher": paths.teacher}).items()) + [("student", paths.student)]
    lines = [f"{'model':8s} {'held-out exact match':>21s} {'SFT steps':>10s}  path"]
    for name, path in rows:
        info = zoo_info(path) or {}
        if "heldout_exact_match" not in info:  # the real pair: no SFT, nothing to score here
            lines.append(f"{name:8s} {'(pretrained)':>21s} {'-':>10s}  {path}")
            continue
        lines.append(f"{name:8s} {info['heldout_exact_match']:21.3f} {info.get('sft_steps', 0):10d}  {path}")
    return "\n".join(lines)


@exit_on_user_error("opd-prepare")
def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    paths = ensure_zoo(cfg)
    print(report(paths, teacher_paths(cfg) if cfg.teachers else None))
    print(f"prepare: {time.time() - t0:.1f}s (zoo: {cfg.zoo_dir})", flush=True)


if __name__ == "__main__":
    main()
