"""opd: on-policy distillation for language models (vLLM rollouts, a teacher, a learner, on Ray)."""

import os as _os

# Before torch is imported anywhere: OpenMP threads that spin while waiting made a training
# step ~70x slower (24 ms -> 1.7 s) whenever another process shared the two cores.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
