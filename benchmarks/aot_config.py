"""A config file plus settings that ``--config.x=y`` flags cannot add, for benchmarks/aot_table.py.

``--config=benchmarks/aot_config.py:configs/gemma2b.py,siglip_scan``: loads ``configs/gemma2b.py``
and applies each named setting (:data:`SETTINGS`): ones that ``--config.a.b=v`` flags cannot make,
because ml_collections refuses keys a config does not already have (``siglip.overrides.scan``) or
that live in a plain dict (``mesh`` as the shipped configs assign it).
"""
import importlib.util
import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = {
    # One compiled SigLIP block run 27 times instead of 27 unrolled copies: same math, a much
    # smaller program (compile time), and XLA can schedule the frozen tower's activations better.
    "siglip_scan": lambda c: c.siglip.overrides.__setattr__("scan", True),
    # FSDP over every chip. A config that assigns ``c.mesh = {...}`` (a plain dict) cannot be
    # changed with --config.mesh.fsdp=..., so the mesh is set here.
    "fsdp_all": lambda c: c.__setattr__("mesh", ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))),
}


def get_config(arg):
    path, *settings = arg.split(",")
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    base_arg = None
    if ":" in os.path.basename(path):
        path, base_arg = path.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("aot_base_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(base_arg) if base_arg else mod.get_config()
    for name in settings:
        if name not in SETTINGS:
            raise KeyError(f"unknown setting {name!r}; known: {sorted(SETTINGS)}")
        SETTINGS[name](c)
    return c
