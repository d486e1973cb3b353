"""Tensor-parallel instances: placement by the rule table, tp=2 == tp=1 token for token, no recompiles."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from kunjax.runtime import compile_stats
from kunjax.model.config import tiny_config
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from sharding.mesh import instance_meshes, split_devices
from kunjax.model.transformer import model_spec
from sharding.rules import KV_POOL_AXES, spec_for, validate_tp

# Shared by the serving tests so their compiled executables are reused within one pytest run.
CONFIG = EngineConfig(page_size=16, num_pages=128, max_model_len=128,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=4))
PROMPTS = ["hello world", "the quick brown fox", "tensor parallel!", "a" * 12]


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(load_model("tiny", "float32"), CONFIG)


def test_rule_table():
    """Each parameter's logical axes live in its module; the one rule table turns them into specs."""
    spec = model_spec(tiny_config())
    layer = lambda n: spec_for(spec.layer.axes[n])  # noqa: E731
    assert layer("wq") == P(None, "tp") and layer("wk") == P(None, "tp")
    assert layer("wo") == P("tp", None) and layer("w_down") == P("tp", None)
    assert layer("w_gate") == P(None, "tp") and layer("w_up") == P(None, "tp")
    assert layer("attn_norm") == P(None) and spec_for(spec.embed.axes["embed"]) == P(None, None)
    assert spec_for(spec.head.axes["lm_head"]) == P(None, "tp")
    assert spec_for(KV_POOL_AXES) == P("tp", None, None, None)
    with pytest.raises(KeyError, match="no rule for logical axes"):
        spec_for(("embed", "no_such_axis"))


def test_validate_tp_errors():
    cfg = tiny_config()  # 4 heads, 2 kv heads
    validate_tp(cfg, 1)
    validate_tp(cfg, 2)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        validate_tp(cfg, 4)
    with pytest.raises(ValueError, match="num_heads=4"):
        validate_tp(cfg, 3)


def test_split_devices():
    groups = split_devices(4, 2)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert len({d for g in groups for d in g}) == 8
    with pytest.raises(ValueError, match="needs 18 devices"):
        split_devices(9, 2)


def test_params_and_kv_are_sharded(host_model):
    mesh = instance_meshes(1, 2)[0]
    eng = LLMEngine(host_model, CONFIG, mesh=mesh)
    lp = eng.stage.layers[0]
    assert lp["wq"].sharding.spec == P(None, "tp")
    assert lp["wo"].sharding.spec == P("tp", None)
    # each device holds half of wq's columns = 2 of the 4 heads
    assert lp["wq"].addressable_shards[0].data.shape == (64, 32)
    k_pool = eng.stage.pools[0][0]
    assert k_pool.sharding.spec == P("tp", None, None, None)
    assert k_pool.addressable_shards[0].data.shape == (1, 128, 16, 16)
    assert set(k_pool.sharding.device_set) == set(mesh.devices.flat)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=10),
                                    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7)],
                         ids=["greedy", "sampled"])
def test_tp2_equals_tp1(host_model, reference, params):
    tp2 = LLMEngine(host_model, CONFIG, mesh=instance_meshes(1, 2)[0])
    want = [o.token_ids for o in reference.generate(PROMPTS, params)]
    got = [o.token_ids for o in tp2.generate(PROMPTS, params)]
    assert got == want


def test_no_recompile_after_warmup(host_model):
    small = EngineConfig(page_size=16, num_pages=16, max_model_len=32,
                         scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_prefill_rows=1))
    eng = LLMEngine(host_model, small, mesh=instance_meshes(1, 2, jax.devices()[6:8])[0])
    eng.warmup()
    assert all(eng.exes.is_ready(k) for k in eng.shape_keys(eng.buckets.all_shapes()))
    before = compile_stats.compile_count()
    outs = eng.generate(["hi", "warm", "x" * 10], SamplingParams(max_tokens=12))
    assert all(len(o.token_ids) == 12 for o in outs)
    assert compile_stats.compile_count() == before
