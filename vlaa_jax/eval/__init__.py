"""Evaluation: benchmark loading, scoring with the reward verifiers, reasoning-behaviour metrics, reports.

    from vlaa_jax.eval import run_eval            # mode="eval" (vlaa_jax.main), config block: eval_config()
    from vlaa_jax.eval import behaviour_metrics   # flat scalars over response strings (GRPO rollouts too)

Modules: benchmarks.py (TSV / JSON / VLAA-Thinking records -> EvalItem) · scoring.py (eval_answer,
Judge, tables) · behaviour.py (length, reflection words, tag validity, accuracy vs length) · harness.py
(prompts, ModelGenerator over the rollout engine, evaluate, run_eval) · config.py (the `eval` block).
Heavy imports (JAX, the model) happen only inside the harness functions that need them.
"""
from vlaa_jax.eval.behaviour import (REFLECTION_WORDS, accuracy_by_length, answer_tag_valid, behaviour_metrics,
                                     format_valid, has_reflection, reflection_counts)
from vlaa_jax.eval.benchmarks import (EVAL_VERIFIER_TYPES, BenchmarkError, EvalItem, infer_verifier_type,
                                      load_benchmark)
from vlaa_jax.eval.config import eval_config
from vlaa_jax.eval.harness import ModelGenerator, PromptBuilder, Responses, evaluate, run_eval
from vlaa_jax.eval.scoring import Judge, Scored, eval_answer, format_table, tables

__all__ = [
    "REFLECTION_WORDS", "accuracy_by_length", "answer_tag_valid", "behaviour_metrics", "format_valid",
    "has_reflection", "reflection_counts", "EVAL_VERIFIER_TYPES", "BenchmarkError", "EvalItem",
    "infer_verifier_type", "load_benchmark", "eval_config", "ModelGenerator", "PromptBuilder", "Responses",
    "evaluate", "run_eval", "Judge", "Scored", "eval_answer", "format_table", "tables",
]
