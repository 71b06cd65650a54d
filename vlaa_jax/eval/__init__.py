"""Evaluation: benchmark loading, scoring with the reward verifiers, reasoning-behaviour metrics, reports.

Modules: benchmarks.py (TSV / JSON / VLAA-Thinking records -> EvalItem) · scoring.py (eval_answer,
Judge, tables) · behaviour.py (length, reflection words, tag validity, accuracy vs length; the GRPO
trainer logs them over its rollouts) · harness.py (prompts, ModelGenerator over the rollout engine,
evaluate, run_eval for mode="eval"; built on vlaa_jax.train). The `eval` config block is in
configs/base.py. Nothing is imported here: the trainers import behaviour.py, and the harness above them
must not come with it.
"""
