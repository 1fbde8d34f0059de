"""Model-free half of the paper's evaluation (LLaVA-1.5 protocol): benchmark readers and prompts
(:mod:`sea_jax.eval.benchmarks`), rule-based scoring (:mod:`sea_jax.eval.scoring`), official
result-file writers, and the ``score`` command (:mod:`sea_jax.eval.score_cli`).

Nothing here imports JAX or loads a model.
"""
from sea_jax.eval.benchmarks import BENCHMARKS, Benchmark, get_benchmark, load, score
from sea_jax.eval.common import EvalInputError, Question, write_llava_answers

__all__ = ["BENCHMARKS", "Benchmark", "EvalInputError", "Question", "get_benchmark", "load",
           "score", "write_llava_answers"]
