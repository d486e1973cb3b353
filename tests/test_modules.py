"""Models as Flax NNX modules: module state per layer and per expert, freed exactly; the
mixture-of-experts family (Qwen3-MoE) through a tensor-parallel run and an orbax round trip."""

import gc

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hf_models import hf_greedy, make_model, save_model
from kunjax.control.batch import null_batch
from kunjax.control.request import SamplingParams
from kunjax.io.checkpoints.orbax_io import save_orbax
from kunjax.io.loader import LoadedModel, load_model
from kunjax.memory.exchange import delete_arrays
from kunjax.memory.measure import live_bytes_by_device
from kunjax.model.config import ModelConfig
from kunjax.model.transformer import init_params, model_spec, take_expert
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.text.tokenizer import ByteTokenizer
from sharding.mesh import instance_meshes

CONFIG = EngineConfig(page_size=16, num_pages=32, max_model_len=128)


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory):
    hf = make_model("qwen3_moe", seed=5)
    return hf, save_model(hf, str(tmp_path_factory.mktemp("qwen3_moe")))


def _prompts(vocab, lens=(7, 21, 40)):
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, n).tolist() for n in lens]


def test_moe_tp2_matches_transformers(moe_hf):
    """Experts split over tp like the dense MLP (each expert's hidden), the router replicated; greedy
    output of a tp=2 instance is token-exact with transformers (so tp=2 == tp=1, the oracle's)."""
    hf, path = moe_hf
    lm = load_model(path, dtype="float32")
    eng = LLMEngine(lm, CONFIG, mesh=instance_meshes(1, 2)[0])
    lp = eng.stage.layers[0]
    assert lp["experts.3.w_gate"].sharding.spec == P(None, "tp")
    assert lp["experts.3.w_down"].sharding.spec == P("tp", None)
    assert lp["experts.3.w_up"].addressable_shards[0].data.shape == (64, 24)  # 48 / tp
    assert lp["router"].sharding.spec == P(None, None)
    prompts = _prompts(lm.config.vocab_size)
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12), f"prompt of {len(prompt)} tokens"


def test_moe_orbax_round_trip(moe_hf, tmp_path):
    """An orbax checkpoint is written from and read into the modules' state, expert by expert."""
    _, path = moe_hf
    a = load_model(path, dtype="float32")
    save_orbax(str(tmp_path / "ckpt"), a.config, a.params)
    b = load_model(str(tmp_path / "ckpt"), dtype="float32")
    assert b.config == a.config
    assert sorted(b.params["layers"][1]) == sorted(model_spec(a.config).layer.keys)
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a.params), jax.tree_util.tree_leaves_with_path(b.params)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def _moe_model() -> LoadedModel:
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=384, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    return LoadedModel("moe", cfg, init_params(cfg, seed=2, scale=0.05), ByteTokenizer(384))


def _expected_bytes(exes, keys, device) -> int:
    """What the module spec says these parameters take on `device`: shard shape x dtype size."""
    spec = exes.spec.layer
    return sum(int(np.prod(exes.layer_sh[k].shard_shape(spec.shapes[k]))) * exes.dtype.itemsize
               for k in keys if device in exes.layer_sh[k].device_set)


def _live(device) -> int:
    gc.collect()
    return live_bytes_by_device().get(device, 0)


def test_deleting_module_state_frees_exactly_its_bytes():
    """One expert's state, then a whole layer's, deleted on their own: the live bytes on every device
    of the instance fall by exactly what the module spec says they hold, and the other layers still
    run (the remaining range serves a step)."""
    eng = LLMEngine(_moe_model(), CONFIG, mesh=instance_meshes(1, 2, jax.devices()[4:6])[0])  # sharded shards
    devices = eng.devices
    spec = eng.exes.spec.layer
    before = {d: _live(d) for d in devices}
    freed = delete_arrays(take_expert(eng.stage.layers[1], 2))
    for d in devices:
        want = _expected_bytes(eng.exes, spec.expert_keys(2), d)
        assert want > 0 and before[d] - _live(d) == want == freed
    assert not any(k.startswith("experts.2.") for k in eng.stage.layers[1])
    before = {d: _live(d) for d in devices}
    freed = delete_arrays(eng.stage.layers.pop(0))
    for d in devices:
        assert before[d] - _live(d) == _expected_bytes(eng.exes, spec.keys, d) == freed
    # layer 2 (untouched) still runs on its own
    shape = eng.buckets.covering_shapes()[0]
    dev = eng.stage.put(null_batch(shape))
    h = eng.stage.run_embed(dev, shape)
    eng.stage.layers = {2: eng.stage.layers[2]}
    assert np.isfinite(np.asarray(eng.stage.run_layers(h, dev, shape))).all()


def test_moe_config_errors_name_the_field():
    """What one compiled layer cannot serve is refused with the field named, before any weight loads."""
    from hf_models import make_config
    from sharding.rules import validate_tp

    hf = make_config("qwen3_moe").to_dict()
    for bad in ({"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig.from_hf_config({**hf, **bad})
    with pytest.raises(ValueError, match="num_experts_per_tok 5"):
        ModelConfig.from_hf_config({**hf, "num_experts_per_tok": 5})
    cfg = ModelConfig.from_hf_config(hf)
    with pytest.raises(ValueError, match="moe_intermediate_size=48"):
        validate_tp(cfg, 32)  # each expert's hidden (48) does not split 32 ways


@pytest.mark.slow
def test_moe_drop_and_restore_are_token_exact():
    """The parameter drop moves and deletes MoE layers (every expert's state with its layer) as it
    does dense ones: a tp=2 pair drops into a pipeline group and restores mid-generation, token-exact
    with an engine that never drops, nothing compiled during either."""
    from test_memory_mechanism import CONFIG as MECH, prompts_for, run_with_transitions

    from kunjax.runtime.cluster import ServingCluster

    model = _moe_model()
    prompts = prompts_for(6, seed=11)
    params = [SamplingParams(max_tokens=16 + i % 5, ignore_eos=True) for i in range(6)]
    want = [o.token_ids for o in LLMEngine(model, MECH).generate(prompts, params)]
    cluster = ServingCluster.build(model, MECH, num_instances=2, tp=2)
    got, rep = run_with_transitions(cluster, prompts, params, drop_at=3, restore_at=5, group_size=2)
    assert got == want
    assert rep["drop"].compiles == 0 and rep["restore"].compiles == 0 and rep["compiles_grouped"] == 0


@pytest.mark.parametrize("normalize", [False, True])
def test_moe_mlp_routes_like_the_definition(normalize):
    """The MoE layer's MLP, merged from its flat state (12 experts: keys sort as strings, experts by
    index), equals a per-token loop over the chosen experts in numpy, with and without renormalising
    the top-k probabilities."""
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True, num_experts=12, num_experts_per_tok=3,
                      moe_intermediate_size=8, norm_topk_prob=normalize)
    spec = model_spec(cfg).layer
    lp = init_params(cfg, seed=0, scale=0.3)["layers"][0]
    merged = spec.merge(lp)
    assert all(np.array_equal(merged.experts[e].w_up[...], lp[f"experts.{e}.w_up"]) for e in range(12))
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    got = np.asarray(jax.jit(lambda state, x: spec.merge(state).mlp(x))(lp, x))
    logits = x.astype(np.float64) @ lp["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(got, dtype=np.float64)
    for t in range(len(x)):
        chosen = np.argsort(-probs[t])[:3]
        weights = probs[t, chosen] / (probs[t, chosen].sum() if normalize else 1.0)
        for e, w in zip(chosen, weights):
            gate, up = x[t] @ lp[f"experts.{e}.w_gate"], x[t] @ lp[f"experts.{e}.w_up"]
            want[t] += w * ((gate / (1 + np.exp(-gate)) * up) @ lp[f"experts.{e}.w_down"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
