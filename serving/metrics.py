"""Prometheus metrics of the server, in their own registry (several servers may live in one process).

JetStream's set (queue length, TTFT/TPOT histograms, slots used) plus measured memory: KV utilisation
per instance and live bytes per device, read by the executor thread that owns the arrays.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OVERLOAD_COUNTERS = ("preemptions", "recomputed_tokens", "swap_outs", "swap_ins", "swapped_out_bytes",
                     "swapped_in_bytes", "migrations_out", "migrations_in", "migrated_bytes")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kunjax_time_to_first_token_seconds", "From gRPC receipt to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kunjax_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kunjax_request_latency_seconds", "From receipt to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram("kunjax_iteration_seconds", "One executor iteration (all instances' steps)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kunjax_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("kunjax_requests_rejected", "Requests refused before running, by gRPC code",
                                ["code"], registry=r)
        self.tokens = Counter("kunjax_generated_tokens", "Generated tokens", registry=r)
        self.queue = Gauge("kunjax_queue_length", "Requests received and not yet running", registry=r)
        self.running = Gauge("kunjax_running_requests", "Requests running on the instances", registry=r)
        self.kv_util = Gauge("kunjax_kv_utilization", "Used / usable KV pages", ["instance"], registry=r)
        self.pages_free = Gauge("kunjax_kv_pages_free", "Free KV pages", ["instance"], registry=r)
        self.live_bytes = Gauge("kunjax_device_live_bytes", "Bytes of live jax arrays", ["device"], registry=r)
        self.bytes_in_use = Gauge("kunjax_device_bytes_in_use", "Allocator bytes in use (GPU/TPU)", ["device"],
                                  registry=r)
        # the memory ledger: live bytes by purpose, per device
        self.ledger = Gauge("kunjax_device_bytes", "Bytes per device by purpose (memory ledger: weights, kv, "
                            "reserve, other, free, budget)", ["device", "kind"], registry=r)
        self.groups = Gauge("kunjax_pipeline_groups", "Pipeline groups of merged instances", registry=r)
        self.grouped = Gauge("kunjax_grouped_instances", "Instances serving as a stage of a pipeline group",
                             registry=r)
        # cumulative since start, read from the cluster (drops and restores are started by Admin or
        # by the kunserve policy): gauges, like the per-instance counters below
        self.transitions = Gauge("kunjax_memory_transitions", "Parameter drops, restores and rolled-back drops "
                                 "since start", ["kind"], registry=r)
        self.transition_s = Histogram("kunjax_memory_transition_seconds", "Duration of a drop or a restore",
                                      ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.exchange_bytes = Gauge("kunjax_kv_exchange_bytes", "KV bytes moved by drops and restores since start: "
                                    "between devices, within a device, chunk padding", ["kind"], registry=r)
        self.policy = Gauge("kunjax_overload_policy", "The kunserve policy's decisions since start (drops, restores, "
                            "fallbacks to recompute) and its cost model's mean absolute % error on the steps "
                            "it observed", ["kind"], registry=r)
        self.freed_weight_bytes = Counter("kunjax_dropped_weight_bytes", "Weight bytes deleted by drops",
                                          registry=r)

        # the KV-centric overload policies' counters per instance (cumulative since start; gauges
        # because they are read from the instances' schedulers, which own them)
        self.overload = Gauge("kunjax_overload_total", "Overload decisions and their traffic per instance since "
                              "start (preemptions, recomputed_tokens, swap_outs, swap_ins, swapped_out_bytes, "
                              "swapped_in_bytes, migrations_out, migrations_in, migrated_bytes)",
                              ["instance", "kind"], registry=r)
        self.swapped = Gauge("kunjax_swapped_requests", "Requests whose KV is in host memory now", ["instance"],
                             registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def update_instances(self, status: dict, queued: int) -> None:
        self.queue.set(status["waiting"] + queued)
        self.running.set(status["running"])
        for s in status["instances"]:
            used = s["pages_total"] - s["pages_free"]
            self.kv_util.labels(str(s["id"])).set(used / max(1, s["pages_total"]))
            self.pages_free.labels(str(s["id"])).set(s["pages_free"])
            for kind in OVERLOAD_COUNTERS:
                if kind in s:
                    self.overload.labels(str(s["id"]), kind).set(s[kind])
            self.swapped.labels(str(s["id"])).set(s.get("swapped", 0))
        counts = status.get("transition_counts", {})
        for kind in ("drops", "restores", "rolled_back"):
            if kind in counts:
                self.transitions.labels(kind).set(counts[kind])
        for kind, key in (("between_devices", "exchanged_bytes"), ("local", "local_bytes"),
                          ("padding", "padding_bytes")):
            if key in counts:
                self.exchange_bytes.labels(kind).set(counts[key])
        pol = status.get("overload_policy", {})
        for kind in ("drops", "restores", "fallbacks"):
            if kind in pol:
                self.policy.labels(kind).set(pol[kind])
        if "cost_model" in pol:
            self.policy.labels("cost_model_error_pct").set(pol["cost_model"]["mean_abs_pct_error"])
        self.groups.set(len(status.get("groups", [])))
        self.grouped.set(sum(len(g["instances"]) for g in status.get("groups", [])))
        for m in status.get("memory", []):
            self.live_bytes.labels(m["device"]).set(m["live"])
            if m.get("bytes_in_use") is not None:
                self.bytes_in_use.labels(m["device"]).set(m["bytes_in_use"])
            for kind in ("weights", "kv", "reserve", "other", "free", "budget"):
                if m.get(kind) is not None:
                    self.ledger.labels(m["device"], kind).set(m[kind])

    def observe_transition(self, report) -> None:
        self.transition_s.labels(report.kind).observe(report.seconds)
        if report.kind == "drop":
            self.freed_weight_bytes.inc(sum(report.freed_weight_bytes.values()))
