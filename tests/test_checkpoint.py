"""sea_jax.checkpoint: round trip (params, optimizer state, meta, Grain iterator), atomicity
(a killed save's temp folder is never a step), fallback past damaged checkpoints, preemption flag."""
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax import checkpoint as C


def _iterator():
    return iter(grain.MapDataset.source(list(range(50))).shuffle(seed=3).repeat(None).to_iter_dataset())


def _trees(step):
    params = {"adapter": {"kernel": jnp.arange(12.0).reshape(3, 4) * step}, "log_tau": jnp.asarray(0.1 * step)}
    opt = {"mu": jnp.full((3, 4), float(step)), "count": jnp.asarray(step, jnp.int32)}
    return params, opt


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save_steps(directory, steps, it):
    ck = C.Checkpointer(directory, keep=10)
    taken = {}
    for s in steps:
        taken[s] = [next(it) for _ in range(3)]
        params, opt = _trees(s)
        assert ck.save(s, params, opt, {"seed": 7}, it)
    ck.close()
    return taken


def test_round_trip_and_iterator_position(tmp_path):
    d = str(tmp_path / "ck")
    it = _iterator()
    _save_steps(d, [2, 4], it)
    continuation = [next(it) for _ in range(5)]  # what follows the step-4 save

    ck = C.Checkpointer(d)
    assert ck.all_steps() == [2, 4]
    params, opt = _trees(0)
    fresh = _iterator()
    r = ck.restore(_abstract(params), _abstract(opt), fresh)
    assert r.step == 4 and r.meta["seed"] == 7 and r.meta["step"] == 4
    want_p, want_o = _trees(4)
    jax.tree.map(np.testing.assert_array_equal, r.params, want_p)
    jax.tree.map(np.testing.assert_array_equal, r.opt_state, want_o)
    assert [next(fresh) for _ in range(5)] == continuation
    s, p = ck.restore_params()
    assert s == 4 and isinstance(p["adapter"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(p["adapter"]["kernel"], np.asarray(want_p["adapter"]["kernel"]))
    ck.close()


def test_interrupted_save_is_never_a_step(tmp_path):
    d = tmp_path / "ck"
    _save_steps(str(d), [2], _iterator())
    # what a save killed before its commit leaves: Orbax's temp folder of a later step
    shutil.copytree(d / "2", d / "6.orbax-checkpoint-tmp-1234")
    ck = C.Checkpointer(str(d))
    assert ck.all_steps() == [2]
    params, opt = _trees(0)
    assert ck.restore(_abstract(params), _abstract(opt), _iterator()).step == 2
    ck.close()


def _truncate_arrays(step_dir):
    n = 0
    for dirpath, _, files in os.walk(step_dir / "params"):
        if os.path.basename(dirpath) == "d":
            for f in files:
                with open(os.path.join(dirpath, f), "r+b") as fh:
                    fh.truncate(8)
                n += 1
    assert n


def test_damaged_newest_falls_back_and_is_set_aside(tmp_path):
    d = tmp_path / "ck"
    it = _iterator()
    taken = _save_steps(str(d), [2, 4, 6], it)
    _truncate_arrays(d / "6")
    (d / "4" / "opt_state" / "manifest.ocdbt").unlink()  # a file missing altogether
    ck = C.Checkpointer(str(d))
    params, opt = _trees(0)
    fresh = _iterator()
    r = ck.restore(_abstract(params), _abstract(opt), fresh)
    assert r.step == 2
    jax.tree.map(np.testing.assert_array_equal, r.params, _trees(2)[0])
    assert next(fresh) == taken[4][0]  # the iterator is at step 2's position
    # the damaged steps are renamed out of the way, so the resumed run can save them again
    assert ck.all_steps() == [2]
    assert sorted(n.split(".")[0] for n in os.listdir(d) if "unrestorable" in n) == ["4", "6"]
    assert ck.save(4, *_trees(4), {"seed": 7}, fresh)
    ck.wait()
    assert ck.all_steps() == [2, 4]
    ck.close()


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path):
    d = tmp_path / "ck"
    _save_steps(str(d), [2], _iterator())
    _truncate_arrays(d / "2")
    ck = C.Checkpointer(str(d))
    params, opt = _trees(0)
    with pytest.raises(RuntimeError, match="no checkpoint"):
        ck.restore(_abstract(params), _abstract(opt), _iterator())
    ck.close()
    assert C.Checkpointer(str(tmp_path / "empty")).restore(_abstract(params), _abstract(opt), _iterator()) is None


def test_preemption_flag():
    flag = C.PreemptionFlag().install()
    try:
        assert not flag.is_set
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.is_set and flag.signum == signal.SIGTERM
        assert C.any_process(flag.is_set)  # one process: the flag itself
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not flag._handle
