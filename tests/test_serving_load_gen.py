"""tools.load_gen without a server: trace parsing (the three formats), arrivals at a rate, fitting
requests to the server's context, and the percentile summary. The runs against a live server are in
tests/test_server.py."""

import json
import math

import numpy as np
import pytest

from tools import load_gen


def test_azure_csv(tmp_path):
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:17:03.9799600,4808,10\n"
                 "2023-11-16 18:17:04.0319600,3180,8\n"
                 "2023-11-16 18:17:06.4799600,12,0\n")
    a = load_gen.load_trace(str(p))
    assert [(x.input_len, x.output_len) for x in a] == [(4808, 10), (3180, 8), (12, 0)]
    assert [round(x.t, 6) for x in a] == [0.0, 0.052, 2.5]
    b = load_gen.load_trace(str(p), offset=1, limit=1)
    assert len(b) == 1 and b[0].t == 0.0 and b[0].input_len == 3180


def test_burstgpt_and_mooncake(tmp_path):
    p = tmp_path / "burst.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,230,1317,Conversation log\n")
    assert [(x.t, x.input_len, x.output_len) for x in load_gen.load_trace(str(p))] == [(0, 472, 18), (40, 1087, 230)]
    q = tmp_path / "mc.jsonl"
    q.write_text("\n".join(json.dumps(d) for d in (
        {"timestamp": 1000, "input_length": 7, "output_length": 3, "hash_ids": [1]},
        {"timestamp": 4000, "input_length": 9, "output_length": 2, "hash_ids": [1, 2]})) + "\n")
    assert [(x.t, x.input_len, x.output_len) for x in load_gen.load_trace(str(q))] == [(0, 7, 3), (3.0, 9, 2)]
    bad = tmp_path / "bad.csv"
    bad.write_text("when,what\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace columns"):
        load_gen.load_trace(str(bad))
    with pytest.raises(ValueError, match="no rows"):
        load_gen.load_trace(str(p), offset=10)


def test_arrivals_at_a_rate():
    rng = np.random.default_rng(0)
    a = load_gen.synthetic_arrivals(4000, 50.0, 1.0, 32, 16, rng)
    gaps = np.diff([x.t for x in a])
    assert a[0].t == 0.0 and abs(gaps.mean() - 1 / 50) < 0.002
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # Poisson: CV 1
    bursty = load_gen.synthetic_arrivals(4000, 50.0, 0.25, 32, 16, rng)
    g = np.diff([x.t for x in bursty])
    assert abs(g.mean() - 1 / 50) < 0.003 and g.std() / g.mean() > 1.5  # gamma shape 1/4: CV 2
    at_once = load_gen.synthetic_arrivals(5, math.inf, 1.0, 8, 4, rng)
    assert {x.t for x in at_once} == {0.0} and {(x.input_len, x.output_len) for x in at_once} == {(8, 4)}


def test_fit_context():
    a = [load_gen.Arrival(0, 4808, 10), load_gen.Arrival(0, 20, 500), load_gen.Arrival(0, 60, 60),
         load_gen.Arrival(0, 60, 68), load_gen.Arrival(0, 62, 68)]
    assert load_gen.fit_context(a, 128) == 3
    assert [(x.input_len, x.output_len) for x in a] == [(118, 10), (20, 64), (60, 60), (60, 68), (62, 64)]
    assert all(x.input_len + x.output_len <= 128 for x in a)


def test_summary_percentiles(capsys):
    rs = [load_gen.Result(ok=True, input_len=10, output_len=5, ttft=0.01 * (i + 1), tpot=0.001 * (i + 1),
                          e2e=0.1, itl=[0.001]) for i in range(100)]
    rs.append(load_gen.Result(ok=False, input_len=10, error="RESOURCE_EXHAUSTED"))
    s = load_gen.summarize(rs, duration=2.0)
    assert s["completed"] == 100 and s["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["request_throughput"] == 50.0 and s["output_tokens_per_s"] == 250.0
    assert s["ttft_ms_p50"] == pytest.approx(505.0) and s["ttft_ms_p99"] == pytest.approx(990.1)
    assert s["tpot_ms_p90"] == pytest.approx(90.1)
    load_gen.print_summary(s)
    out = capsys.readouterr().out
    assert "throughput: 50.00 req/s, 250.0 output tok/s" in out
    assert "ttft_ms" in out and "p99    990.10" in out
