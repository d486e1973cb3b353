"""tools.bench --smoke end to end: one launcher subprocess per policy on the tiny model, a burst of
Azure code requests replayed through the client library, the table, the CSVs and the plots."""

import csv
import json

import pytest

from tools import bench


def test_bench_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = bench.main(["--smoke", "--trace_limit", "24", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    summary = json.loads((out / "summary.json").read_text())
    table = {m["policy"]: m for m in summary["policies"]}
    assert set(table) == {"recompute", "swap"} and not summary["errors"]
    for m in table.values():
        assert m["completed"] == m["requests"] == 24 and m["ttft_ms_p99"] > 0 and m["tpot_ms_p50"] > 0
        assert m["preemptions"] > 0  # the smoke slice overloads the small pools
    assert table["recompute"]["recomputed_tokens"] > 0 and table["recompute"]["swap_outs"] == 0
    assert table["swap"]["swap_outs"] > 0 and table["swap"]["swapped_out_bytes"] > 0
    assert "recompute" in text and "swap" in text and "TTFT p50/p90/p99" in text
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48
    for r in rows:
        times = [float(t) for t in r["token_times_s"].split(";")]
        assert len(times) == int(r["tokens"]) == int(r["max_tokens"])  # ignore_eos: every token arrived
        assert float(r["send_s"]) <= times[0] == float(r["first_token_s"]) <= times[-1] == float(r["last_token_s"])
        assert times == sorted(times)
    with open(out / "events.csv") as f:
        events = list(csv.DictReader(f))
    kinds = {(e["policy"], e["kind"]) for e in events}
    assert ("recompute", "preempt") in kinds and ("swap", "swap_out") in kinds and ("swap", "swap_in") in kinds
    swap_out_bytes = sum(int(e["bytes"]) for e in events if e["policy"] == "swap" and e["kind"] == "swap_out")
    assert swap_out_bytes == table["swap"]["swapped_out_bytes"]  # the event log and the counters agree
    with open(out / "timeline.csv") as f:
        samples = list(csv.DictReader(f))
    assert {s["policy"] for s in samples} == {"recompute", "swap"}
    assert any(s["weights_bytes_per_device"] for s in samples)
    for name in ("ttft_cdf.png", "timeline_recompute.png", "timeline_swap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_a_policy_the_server_refuses(tmp_path, capsys):
    """An --overload_policy value the launcher rejects is reported as that policy's failure."""
    rc = bench.main(["--smoke", "--policies", "nope", "--trace_limit", "2", "--out", str(tmp_path)])
    assert rc == 1
    assert "nope" in capsys.readouterr().out
    assert "nope" in json.loads((tmp_path / "summary.json").read_text())["errors"]


def test_ratios_against_kunserve():
    table = [{"policy": "recompute", "completed": 5, "ttft_ms_p99": 900.0, "tpot_ms_p99": 20.0},
             {"policy": "kunserve", "completed": 5, "ttft_ms_p99": 90.0, "tpot_ms_p99": 25.0}]
    (r,) = bench.ratios(table)
    assert r["policy"] == "recompute" and r["p99_ttft_over_kunserve"] == pytest.approx(10.0)
    assert r["kunserve_p99_tpot_over_policy"] == pytest.approx(1.25)
    assert bench.ratios(table[:1]) == []


def test_replay_keeps_failed_requests(tmp_path):
    """load_gen.replay loses no request: two refused (INVALID_ARGUMENT: longer than the context;
    max_tokens 0), one served; each keeps its send and finish times and the tokens it got, and the
    CSV has a row for each."""
    import asyncio

    from kunjax.control.scheduler import SchedulerConfig
    from kunjax.io.loader import load_model
    from kunjax.runtime.cluster import ServingCluster
    from kunjax.runtime.engine import EngineConfig
    from serving.server import ServerThread
    from tools import load_gen

    cfg = EngineConfig(page_size=8, num_pages=30, max_model_len=256,
                       scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_rows=2))
    srv = ServerThread(ServingCluster.build(load_model("tiny", "float32"), cfg)).start()
    try:
        arrivals = [load_gen.Arrival(0.0, 300, 4), load_gen.Arrival(0.0, 8, 0), load_gen.Arrival(0.0, 8, 6)]
        run = asyncio.run(load_gen.replay(f"localhost:{srv.port}", arrivals, fit=False, timeout=None))
    finally:
        srv.stop()
    too_long, zero, served = run["results"]
    assert too_long.error == zero.error == "INVALID_ARGUMENT" and not too_long.ok and too_long.token_times == []
    assert "max_tokens" in zero.error_message
    assert served.ok and served.finish_reason == "length" and len(served.token_times) == 6
    assert served.send_t <= served.token_times[0] <= served.finish_t and served.server_queue_ms is not None
    assert all(r.send_t is not None and r.finish_t >= r.send_t for r in run["results"])
    path = tmp_path / "r.csv"
    load_gen.write_requests_csv(str(path), run["results"], {"policy": "x"})
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["error"] for r in rows] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", ""] and rows[2]["tokens"] == "6"
