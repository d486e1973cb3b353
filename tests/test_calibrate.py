"""Start-up calibration of the cost model on a real (tiny) instance: samples from timed null steps,
a non-negative fit that predicts the steps it was fitted on, bandwidths, nothing compiled for the
steps, the pools unchanged."""

import jax
import numpy as np

from kunjax.control.scheduler import SchedulerConfig
from kunjax.runtime import compile_stats
from kunjax.runtime.calibrate import calibrate
from kunjax.runtime.engine import EngineConfig, LLMEngine
from jax.sharding import Mesh
from sharding.rules import replicated


def test_calibrate_fits_the_instance_it_timed(host_model):
    config = EngineConfig(page_size=8, num_pages=64, max_model_len=128,
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_rows=2))
    eng = LLMEngine(host_model, config, device=jax.devices()[0])
    peer = replicated(Mesh(np.array(jax.devices()[1:2]), ("tp",)))
    shapes = eng.buckets.covering_shapes()
    assert all(eng.stage.ready(s) for s in shapes)
    before = {l: np.asarray(k) for l, (k, _) in eng.stage.pools.items()}
    steps_compiled = compile_stats.compile_count()
    cm = calibrate(eng, shapes, peer=peer, repeats=2, transfer_bytes=1 << 20)
    assert compile_stats.compile_count() - steps_compiled == 1  # the local-copy probe only, no step shape
    assert np.all(cm.coef >= 0) and cm.coef.sum() > 0
    assert cm.bandwidths["local"] > 0 and cm.bandwidths["d2d"] > 0
    for s in shapes:  # every step it timed has a cost
        assert cm.shape_time(s, len(eng.stage.layer_ids)) > 0
    assert set(eng.stage.pools) == set(before)
    for l, (k, _) in eng.stage.pools.items():  # null steps touch the null page only
        np.testing.assert_array_equal(np.asarray(k)[:, 1:], before[l][:, 1:])
    out = eng.generate([[1, 2, 3]])  # the instance still serves with the pools calibrate handed back
    assert len(out[0].token_ids) == 16
