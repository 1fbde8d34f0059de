"""The embedded demo (issue 8): SEA end to end on a laptop CPU, with no weights and no data.

``python -m sea_jax.train --config=configs/demo.py --workdir=DIR``: the trainer calls
:func:`prepare`, which generates the world (:mod:`sea_jax.demo.world`), writes it with its
tokenizers and word list (:mod:`sea_jax.demo.assets`) under ``DIR/demo_assets/`` once, pretrains
the two frozen towers on it (:mod:`sea_jax.demo.pretrain`) and fills the config's paths; then
:mod:`sea_jax.demo.run` trains SEA and the lambda = 0 baseline (both stages) and prints the
report of :mod:`sea_jax.demo.report` and :mod:`sea_jax.probe`.
"""
from sea_jax.demo.prepare import prepare

__all__ = ["prepare"]
