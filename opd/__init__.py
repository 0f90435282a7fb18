"""opd: on-policy distillation for language models (vLLM rollouts, a teacher, a learner, on Ray)."""
