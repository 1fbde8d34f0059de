"""The embedded demo: SEA end to end on a laptop CPU, with no weights and no data.

``python -m sea_jax.train --config=configs/demo.py --workdir=DIR`` runs the config's runner,
:func:`sea_jax.demo.run.run_demo`: :func:`prepare` generates the world (:mod:`sea_jax.demo.world`),
writes it with its tokenizers and word list (:mod:`sea_jax.demo.assets`) under
``DIR/demo_assets/`` once, pretrains the two frozen towers on it (:mod:`sea_jax.demo.pretrain`)
and fills the config's paths; then the trainer runs SEA and the lambda = 0 baseline (both stages)
and :mod:`sea_jax.demo.report` and :mod:`sea_jax.probe` print the report. The trainer itself knows
nothing of the demo.
"""
from sea_jax.demo.prepare import prepare

__all__ = ["prepare"]
