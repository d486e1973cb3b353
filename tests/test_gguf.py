"""GGUF checkpoints: small files written from random HF models (F32 and Q8_0, llama's permuted q/k),
the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loading, and bad files."""

import os

import numpy as np
import pytest
import torch

import gguf
from gguf_fixtures import dequantized_copy, kunjax_vs_hf_pairs, make_hf_model, permute_qk, write_gguf
from kunjax.io.checkpoints.gguf import load_gguf, open_gguf, smollm2_path, unpermute_qk
from kunjax.runtime.engine import EngineConfig, LLMEngine
from kunjax.io.loader import load_model
from kunjax.control.request import SamplingParams

PAGE = 16
NEW_TOKENS = 16
LOGIT_ATOL = 1e-4  # f32 vs f32 on a 3-layer model with O(1) logits

CASES = [("llama", "F32"), ("llama", "Q8_0"), ("llama3", "F32"), ("qwen2", "F32"), ("qwen2", "Q8_0"),
         ("qwen3", "F32")]

@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{q}" for f, q in CASES])
def case(request, tmp_path_factory):
    family, qtype = request.param
    hf = make_hf_model(family)
    path = write_gguf(hf, str(tmp_path_factory.mktemp("gguf") / f"{family}-{qtype}.gguf"), qtype=qtype)
    return family, qtype, hf, dequantized_copy(hf, qtype), load_model(path, dtype="float32")


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, hd, cols in ((4, 16, 8), (3, 64, 5), (2, 8, None)):
        w = rng.standard_normal((heads * hd, cols) if cols else (heads * hd,)).astype(np.float32)
        p = permute_qk(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, heads), w)
        # rotary pair (j, j + hd/2) of each head sits at rows (2j, 2j + 1) in llama.cpp's order
        np.testing.assert_array_equal(p[1], w[hd // 2])


def test_config_from_metadata(case):
    family, _, hf, _, lm = case
    cfg, hcfg = lm.config, hf.config
    assert cfg.model_type == {"llama3": "llama"}.get(family, family)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        hcfg.num_hidden_layers, hcfg.hidden_size, hcfg.intermediate_size)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        hcfg.num_attention_heads, hcfg.num_key_value_heads, hcfg.vocab_size)
    assert cfg.head_dim == (32 if family == "qwen3" else 16)
    assert cfg.tie_word_embeddings == bool(hcfg.tie_word_embeddings) == ("lm_head" not in lm.params)
    assert cfg.attention_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    if family == "llama3":
        s = cfg.rope_scaling
        assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (8, 1, 4, 32)
    else:
        assert cfg.rope_scaling is None
    assert "<|im_start|>" in lm.chat_template


def test_weights_equal_hf(case):
    _, qtype, hf, hf_q, lm = case
    for name, ours, ref in kunjax_vs_hf_pairs(lm.params, hf_q):
        ours = np.asarray(ours)
        assert ours.shape == ref.shape, name
        np.testing.assert_array_equal(ours, ref, err_msg=name)  # F32 exactly; Q8_0 equals the round trip
    if qtype == "Q8_0":  # and the round trip is within Q8_0's error of the original weights
        quantized = 0
        for name, ours, ref in kunjax_vs_hf_pairs(lm.params, hf):
            ours = np.asarray(ours)
            if ref.ndim == 2 and not np.array_equal(ours, ref):
                quantized += 1
                # Q8_0: blocks of 32 along the input dim, step d = max|w| / 127 stored as f16: error <= d/2
                # plus the f16 rounding of d times |q| <= 127 (2^-11 * 127 d)
                blocks = ref.T.reshape(ref.shape[1], -1, 32) if name != "embed" else ref.reshape(ref.shape[0], -1, 32)
                step = np.abs(blocks).max(-1).max() / 127
                assert np.abs(ours - ref).max() <= 0.57 * step + 1e-6, name
        assert quantized > 0


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [lg[0].float().numpy() for lg in out.logits]


def test_logits_and_greedy_through_engine(case):
    """Greedy through the engine (chunked prefill, several pages) equals HF generate on the same weights."""
    family, _, _, hf_q, lm = case
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (5, 17, 40)]
    eng = LLMEngine(lm, EngineConfig(page_size=PAGE, num_pages=32, max_model_len=128))
    outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref_ids, ref_logits = _hf_greedy(hf_q, prompt, NEW_TOKENS)
        assert out.token_ids == ref_ids, f"{family}: prompt of {len(prompt)} tokens"
    # last-position logits of one prompt, and they are not near-ties
    eng.keep_logits = True
    eng.generate([prompts[1]], SamplingParams(max_tokens=1))
    ours = np.asarray(eng.last_logits[0])
    with torch.no_grad():
        ref = hf_q(torch.tensor([prompts[1]])).logits[0, -1].numpy()
    top2 = np.sort(ref)[-2:]
    assert top2[1] - top2[0] > 10 * LOGIT_ATOL
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)


def test_toy_tokenizer_from_file(case):
    _, _, _, _, lm = case
    tok = lm.tokenizer
    ids = tok.encode("hello world and the end")
    assert tok.decode(ids) == "hello world and the end"
    assert len(ids) < len("hello world and the end")  # merges applied
    assert tok.encode("<|im_start|>user", add_special_tokens=True)[0] == 1
    assert tok.decode([1, *tok.encode("hi"), 2]) == "hi"  # control tokens skipped


def test_all_supported_tensor_types(tmp_path):
    """Every listed GGUF type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, and Q5_0 / Q5_1) dequantizes
    and lands in the right place: kunjax weight == gguf's dequantization of the stored bytes (un-permuted,
    transposed), and that is within the type's quantization error of the original HF weight. Q4_K / Q5_K /
    Q6_K are written by the test's own encoder (gguf_fixtures.quantize_k, from ggml's block layouts), so
    the decoding is checked against an independent implementation. Q2_K / Q3_K, which kunjax also
    accepts, are stored as random bytes and only checked for placement."""
    T = gguf.GGMLQuantizationType
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3)
    qtypes = {"token_embd.weight": T.Q8_0, "output.weight": T.Q6_K, "blk.0.attn_q.weight": T.Q4_0,
              "blk.0.attn_k.weight": T.Q4_1, "blk.0.attn_v.weight": T.Q5_0, "blk.0.attn_output.weight": T.Q5_1,
              "blk.0.ffn_gate.weight": T.F16, "blk.0.ffn_up.weight": T.BF16, "blk.0.attn_norm.weight": T.F16,
              "blk.0.ffn_norm.weight": T.BF16, "blk.1.attn_q.weight": T.Q4_K, "blk.1.attn_k.weight": T.Q5_K,
              "blk.1.attn_v.weight": T.Q6_K, "blk.1.ffn_gate.weight": T.Q4_K, "blk.1.ffn_down.weight": T.Q5_K,
              "blk.1.ffn_up.weight": T.Q6_K}
    raw = {"blk.2.attn_output.weight": T.Q2_K, "blk.2.ffn_down.weight": T.Q3_K}
    path = write_gguf(hf, str(tmp_path / "mixed.gguf"), qtypes=qtypes, raw_types=raw)
    lm = load_model(path, dtype="float32")
    cfg = lm.config
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    listed = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K}
    assert listed <= {t.tensor_type for t in stored.values()}
    assert {stored[n].tensor_type for n in {**qtypes, **raw}} == set(qtypes.values()) | set(raw.values())
    keys = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w_gate",
            "ffn_up": "w_up", "ffn_down": "w_down", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}
    # Error bound of each type's round trip, as a fraction of the tensor's largest |w| (A). Symmetric
    # types (Q8_0, Q4_0, Q5_0) scale by the signed block extreme, so the opposite extreme is clipped to
    # one step short: error <= one full step (1/8 of the block max for Q4_0, 1/16 for Q5_0, 1/128 Q8_0).
    # Affine types (Q4_1, Q5_1) err by half a step of (max - min) / (2^bits - 1). K-quants (our encoder):
    # half a step, the step being the sub-block's (max - min) / (2^bits - 1) rounded up to a multiple of the
    # 6-bit scale unit d, plus half the 6-bit min unit: Q4_K (2A/15)(64/63)/2 + A/126 = 0.076 A, Q5_K
    # 0.041 A; Q6_K (symmetric, |q| <= 31, 8-bit scales) (A/31)(128/127)/2 = 0.0163 A. Slack for f16 scales.
    bound = {T.F32: 0.0, T.Q8_0: 0.009, T.Q4_0: 0.13, T.Q4_1: 0.07, T.Q5_0: 0.065, T.Q5_1: 0.035, T.F16: 1e-3,
             T.BF16: 8e-3, T.Q4_K: 0.08, T.Q5_K: 0.045, T.Q6_K: 0.018}
    hf_pairs = {n: ref for n, _, ref in kunjax_vs_hf_pairs(lm.params, hf)}
    checked = set()
    for name, t in stored.items():
        ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(reversed([int(x) for x in t.shape])))
        if name.endswith("attn_q.weight"):
            ref = unpermute_qk(ref, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            ref = unpermute_qk(ref, cfg.num_kv_heads)
        ref = ref.T if ref.ndim == 2 else ref
        if name == "token_embd.weight":
            kname = "embed"
            ref = ref.T
        elif name == "output.weight":
            kname = "lm_head"
        elif name == "output_norm.weight":
            kname = "final_norm"
        else:
            _, i, part, _ = name.split(".")
            kname = f"layers.{i}.{keys[part]}"
        ours = lm.params[kname] if "." not in kname else lm.params["layers"][int(kname.split(".")[1])][
            kname.split(".")[2]]
        np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=name)
        if t.tensor_type in bound:
            orig = hf_pairs[kname]
            err = np.abs(ref - orig).max() / np.abs(orig).max()
            assert err <= bound[t.tensor_type], f"{name} ({t.tensor_type.name}): error {err:.4f} of max |w|"
            checked.add(t.tensor_type)
    assert checked == listed | {T.Q5_0, T.Q5_1}

    # Our header reader (kunjax.io.checkpoints.gguf_file) sees what the gguf package's reader sees:
    # every metadata value, and every tensor's type, shape and bytes.
    ours_file = open_gguf(path)
    ref_file = gguf.GGUFReader(path)
    for key, field in ref_file.fields.items():
        if not key.startswith("GGUF."):  # the package's own pseudo-keys (version, counts)
            assert ours_file.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours_file.tensors] == [t.name for t in ref_file.tensors]
    for a, b in zip(ours_file.tensors, ref_file.tensors):
        assert (a.tensor_type, a.shape, a.n_elements) == (b.tensor_type, tuple(int(x) for x in b.shape), b.n_elements)
        assert a.data.tobytes() == np.ascontiguousarray(b.data).tobytes(), a.name


# ---- bad files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_llama():
    return make_hf_model("llama")


def test_truncated_file(small_llama, tmp_path):
    path = write_gguf(small_llama, str(tmp_path / "full.gguf"))
    data = open(path, "rb").read()
    for cut in (len(data) - 100, len(data) // 2, 200):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_model(str(bad), dtype="float32")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(bad), dtype="float32")


def test_unknown_architecture(small_llama, tmp_path):
    path = write_gguf(small_llama, str(tmp_path / "falcon.gguf"), arch="falcon")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'"):
        load_model(path, dtype="float32")


def test_unknown_quant_type(small_llama, tmp_path):
    path = write_gguf(small_llama, str(tmp_path / "iq.gguf"),
                      raw_types={"blk.0.attn_q.weight": gguf.GGMLQuantizationType.IQ4_NL})
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has unsupported GGUF type IQ4_NL"):
        load_model(path, dtype="float32")


def test_missing_tensor(small_llama, tmp_path):
    path = write_gguf(small_llama, str(tmp_path / "missing.gguf"), drop=("blk.2.ffn_up.weight",))
    with pytest.raises(ValueError, match="tensor 'blk.2.ffn_up.weight' is missing"):
        load_model(path, dtype="float32")


def test_unknown_pre_tokenizer(small_llama, tmp_path):
    path = write_gguf(small_llama, str(tmp_path / "pre.gguf"), pre="made-up-pre")
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'made-up-pre'"):
        load_model(path, dtype="float32")


def test_smollm2_path_and_metadata():
    path = smollm2_path()
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    lm = load_gguf(path, dtype=np.float32, place=lambda a: a, name="smollm2-135m")
    cfg = lm.config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "llama", 30, 576, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and "lm_head" not in lm.params
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)  # <|im_start|>, <|im_end|>
    assert lm.tokenizer.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert lm.params["embed"].dtype == np.float32 and lm.params["layers"][0]["wq"].shape == (576, 576)
