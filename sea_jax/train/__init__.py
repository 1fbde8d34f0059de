"""Training, both stages: :func:`train` (the loop, :mod:`sea_jax.train.loop`) and its side jobs as
hooks (:mod:`sea_jax.train.hooks`). ``python -m sea_jax.train`` is the command line
(:mod:`sea_jax.train.__main__`)."""
from sea_jax.train.hooks import Hooks, StepInfo, StopTraining
from sea_jax.train.loop import Plan, check_paths, compile_program, plan, train

__all__ = ["train", "check_paths", "plan", "Plan", "compile_program", "Hooks", "StepInfo", "StopTraining"]
