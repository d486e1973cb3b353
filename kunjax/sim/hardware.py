"""What a simulated device costs: GPU presets with their public sources, and a roofline step model
(plain Python and numpy, no JAX).

A step of an instance (tp devices holding one replica) runs its layers one after the other; each
layer reads its weights once and the KV its rows attend to, and computes 2 FLOPs per weight per
token plus attention. On a device with peak compute P and memory bandwidth W, and efficiency factors
e_c and e_m (what a real kernel reaches of each peak), a layer takes

    max(FLOPs / (P e_c), bytes / (W e_m)) + layer_overhead + TP all-reduce

and a step adds the head (final norm + LM head + sampling: a matmul over the vocabulary for each
sampled row) and a fixed step overhead (host scheduling, batch building, launches). Tensor parallel:
weights, KV heads and FLOPs split tp ways; two all-reduces per layer of the step's hidden states,
each a ring all-reduce, 2 (tp-1)/tp x bytes over the intra-node link plus a latency.

Links carry the mechanism's and the baselines' bytes: "d2d" (NVLink in a node; between nodes the
network), "host" (PCIe: swap), "network" (between nodes), "local" (a copy on one device: HBM read +
write). A transition's time is bytes / (bandwidth x link efficiency).

The figures of each preset come from the vendor's public datasheet named in `source` (dense BF16
tensor throughput, not the 2x sparse one; NVLink and PCIe per direction, half the bidirectional
figure the datasheets headline). The efficiency factors of a preset are assumptions until fitted:
`python -m tools.simulate --calibrate` fits them (and the overheads) from real steps on the devices
at hand, and reports how well the fit predicts them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

from kunjax.control.batch import StepShape
from kunjax.control.cost_model import nonnegative_lstsq
from kunjax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Peak figures of one device (bytes and bytes/s, FLOP/s)."""

    name: str
    flops: float  # dense peak at the serving dtype (BF16 on GPUs)
    hbm_bandwidth: float
    hbm_bytes: int
    nvlink_bandwidth: float  # per GPU, per direction (device to device inside a node)
    pcie_bandwidth: float  # host <-> device, per direction
    network_bandwidth: float  # per GPU, between nodes
    devices_per_node: int = 8
    source: str = ""


GB = 1e9
MAX_EFFICIENCY = 20.0  # a fitted factor against a measured (not a datasheet) peak may exceed 1
KV_PASSES = 3  # a layer's KV bytes per step: the gather reads the pages and writes the context, attention reads it


def _gpu(name: str, tflops: float, hbm_gb: int, hbm_tbs: float, nvlink_gbs: float, pcie_gbs: float, net_gbs: float,
         source: str) -> DeviceSpec:
    return DeviceSpec(name, flops=tflops * 1e12, hbm_bandwidth=hbm_tbs * 1e12, hbm_bytes=hbm_gb * 10**9,
                      nvlink_bandwidth=nvlink_gbs * GB, pcie_bandwidth=pcie_gbs * GB, network_bandwidth=net_gbs * GB,
                      source=source)


# name, dense BF16 TFLOP/s, HBM GB, HBM TB/s, NVLink / PCIe / network GB/s per GPU and direction
PRESETS = {spec.name: spec for spec in (
    _gpu("h100-sxm", 989.4, 80, 3.35, 450, 64, 50,
         "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: BF16 1,979 TFLOPS with sparsity = 989.4 dense, 80 GB "
         "HBM3 at 3.35 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s, both bidirectional); NVIDIA DGX H100 user "
         "guide (8x ConnectX-7 400 Gb/s: 50 GB/s per GPU)"),
    _gpu("h200", 989.4, 141, 4.8, 450, 64, 50,
         "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM: BF16 1,979 TFLOPS with sparsity = 989.4 dense, 141 GB "
         "HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s, both bidirectional); DGX H200 (8x ConnectX-7 "
         "400 Gb/s: 50 GB/s per GPU)"),
    _gpu("a100-80gb", 312, 80, 2.039, 300, 32, 25,
         "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: BF16 312 TFLOPS dense, HBM2e 2,039 GB/s, NVLink "
         "600 GB/s, PCIe Gen4 64 GB/s, both bidirectional); NVIDIA DGX A100 (8x 200 Gb/s HDR: 25 GB/s per GPU)"),
)}


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """What real kernels reach of the peaks, and the costs no peak explains (seconds)."""

    compute: float = 0.6  # of peak FLOP/s (prefill, large batches)
    memory: float = 0.8  # of peak HBM bandwidth (decode: weights and KV read)
    link: float = 0.8  # of every link's bandwidth for bulk copies (KV exchange, weights, swap, migration)
    tp_link: float = 0.8  # of NVLink's bandwidth for the TP all-reduces of a step
    step_overhead_s: float = 2e-3  # per step: host scheduling, batch building, launches
    layer_overhead_s: float = 2e-5  # per layer of a step: its kernel launches
    allreduce_latency_s: float = 1e-5  # per TP all-reduce
    # What the serving path (executor, gRPC, the client) adds to when a client sees each token,
    # beyond the steps: from the request's send to its first step, and from a step to the client.
    first_token_latency_s: float = 0.0

    def validate(self) -> None:
        for f in ("compute", "memory", "link", "tp_link"):  # of a measured peak (or a scaled link) may exceed 1
            if not 0 < getattr(self, f) <= MAX_EFFICIENCY:
                raise ValueError(f"efficiency.{f} must be in (0, {MAX_EFFICIENCY}], got {getattr(self, f)}")
        for f in ("step_overhead_s", "layer_overhead_s", "allreduce_latency_s", "first_token_latency_s"):
            if getattr(self, f) < 0:
                raise ValueError(f"efficiency.{f} must be >= 0, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A device's peaks and fitted efficiencies (what `--calibrate` writes, `--calibration` reads)."""

    spec: DeviceSpec
    efficiency: Efficiency
    fit: dict = dataclasses.field(default_factory=dict)  # how well it predicts the steps it was fitted on
    overlap_stages: bool = True  # a pipeline group's stages run at the same time (False: virtual CPU devices)
    # The devices share one set of cores (virtual CPU devices): steps in flight at once share a host
    # of this capacity in lone-step units (kunjax.sim.sharing: each at min(1, C / k) of its lone speed
    # while k run). None: every instance has its own devices (GPUs), its steps run in parallel.
    host_capacity: Optional[float] = None

    @property
    def shared_devices(self) -> bool:
        return self.host_capacity is not None

    def to_json(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "efficiency": dataclasses.asdict(self.efficiency),
                "fit": self.fit, "overlap_stages": self.overlap_stages, "shared_devices": self.shared_devices,
                "host_capacity": self.host_capacity}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        """A calibration file; one written before host_capacity existed with shared_devices true
        meant one step's work at a time on the shared cores: capacity 1."""
        try:
            cap = d.get("host_capacity")
            if cap is None and d.get("shared_devices", False):
                cap = 1.0
            if cap is not None and not float(cap) >= 1.0:
                raise ValueError(f"host_capacity must be >= 1, got {cap}")
            return cls(DeviceSpec(**d["spec"]), Efficiency(**d["efficiency"]), d.get("fit", {}),
                       bool(d.get("overlap_stages", True)), None if cap is None else float(cap))
        except (KeyError, TypeError) as e:
            raise ValueError(f"calibration: not a calibration file ({e})") from None

    @classmethod
    def load(cls, path: str) -> "Calibration":
        with open(path) as f:
            return cls.from_json(json.load(f))


def preset(name: str) -> Calibration:
    if name not in PRESETS:
        raise ValueError(f"gpu: {name!r} is not one of {', '.join(PRESETS)}")
    return Calibration(PRESETS[name], Efficiency())


class DeviceModel:
    """Step and transfer times of one instance of `cfg` on tp devices of a calibrated kind."""

    def __init__(self, cfg: ModelConfig, calibration: Calibration, tp: int = 1, dtype_bytes: int = 2):
        calibration.efficiency.validate()
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.cfg, self.cal, self.tp, self.dtype_bytes = cfg, calibration, tp, dtype_bytes
        self.spec, self.eff = calibration.spec, calibration.efficiency
        c = cfg
        per_layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * c.mlp_size
        self.layer_params = per_layer  # matmul weights of a layer (norms are negligible)
        self.active_layer_params = (per_layer if not c.is_moe else
                                    c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                                    + 3 * c.hidden_size * c.moe_intermediate_size * c.num_experts_per_tok)
        if c.is_moe:
            self.layer_params = (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                                 + 3 * c.hidden_size * c.moe_intermediate_size * c.num_experts)
        self.kv_token_layer_bytes = 2 * c.kv_size * dtype_bytes  # K and V of one token in one layer

    # ---- memory of one device --------------------------------------------------------------
    def layer_bytes(self) -> int:
        """Weights of one layer on one device."""
        return int((self.layer_params + 2 * self.cfg.hidden_size) * self.dtype_bytes) // self.tp

    def embed_bytes(self) -> int:
        return self.cfg.vocab_size * self.cfg.hidden_size * self.dtype_bytes // self.tp

    def head_bytes(self) -> int:
        """Final norm + LM head (the norm only when the head is the tied embedding)."""
        norm = self.cfg.hidden_size * self.dtype_bytes
        return norm if self.cfg.tie_word_embeddings else norm + self.embed_bytes()

    def page_layer_bytes(self, page_size: int) -> int:
        """One page of one layer's KV (K and V) on one device."""
        return page_size * self.kv_token_layer_bytes // self.tp

    def reserve_bytes(self, max_tokens: int, max_rows: int) -> int:
        """Activation room of the largest step: the hidden states and MLP intermediates of its
        tokens (a few live at once) and the logits of its sampled rows."""
        c = self.cfg
        act = max_tokens * (4 * c.hidden_size + 2 * c.mlp_size // self.tp) * self.dtype_bytes
        return int(act + max_rows * c.vocab_size * 4 // self.tp)

    # ---- time ------------------------------------------------------------------------------
    def _roof(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.spec.flops * self.eff.compute), nbytes / (self.spec.hbm_bandwidth * self.eff.memory))

    def allreduce_time(self, tokens: int) -> float:
        """One ring all-reduce of `tokens` hidden states over the instance's tp devices."""
        if self.tp == 1:
            return 0.0
        nbytes = tokens * self.cfg.hidden_size * self.dtype_bytes
        return (2 * (self.tp - 1) / self.tp * nbytes / (self.spec.nvlink_bandwidth * self.eff.tp_link)
                + self.eff.allreduce_latency_s)

    def layer_work(self, shape: StepShape, page_size: int, rows: Optional[Sequence] = None) -> tuple[float, float]:
        """(FLOPs, bytes) per device of one layer of a step run at the padded `shape`. Attention as
        kunjax computes it (`rows` None): every row attends to its `pages` gathered pages in full,
        the mask hiding what is not context, the gather reading and writing them first. With `rows`
        ((query tokens, context tokens) of each real row): as a paged-attention kernel would, each
        row over its own context, its pages read once (the `--attention=paged` what-if)."""
        c = self.cfg
        tokens = shape.rows * shape.query
        ctx = shape.pages * page_size
        if rows is None:
            attn_flops, kv_tokens = 4 * tokens * ctx * c.q_size, KV_PASSES * shape.rows * ctx
        else:
            attn_flops, kv_tokens = sum(4 * n * t * c.q_size for n, t in rows), sum(t for _, t in rows)
        flops = 2 * self.active_layer_params * tokens + attn_flops  # + QK^T and PV
        weights = self.layer_params * self.dtype_bytes
        if c.is_moe:  # the experts the step's tokens route to, at most all of them
            per_expert = 3 * c.hidden_size * c.moe_intermediate_size * self.dtype_bytes
            weights += (min(c.num_experts, tokens * c.num_experts_per_tok) - c.num_experts) * per_expert
        nbytes = weights + kv_tokens * self.kv_token_layer_bytes
        return flops / self.tp, nbytes / self.tp

    def head_work(self, sampled_rows: int) -> tuple[float, float]:
        c = self.cfg
        return (2 * c.hidden_size * c.vocab_size * sampled_rows / self.tp,
                c.hidden_size * c.vocab_size * self.dtype_bytes / self.tp)

    def layer_time(self, shape: StepShape, page_size: int, rows: Optional[Sequence] = None) -> float:
        return (self._roof(*self.layer_work(shape, page_size, rows)) + self.eff.layer_overhead_s
                + 2 * self.allreduce_time(shape.rows * shape.query))

    def head_time(self, sampled_rows: int) -> float:
        return self._roof(*self.head_work(sampled_rows))

    def step_time(self, shape: StepShape, page_size: int, layers: Optional[int] = None, head: bool = True,
                  overhead: bool = True, rows: Optional[Sequence] = None) -> float:
        """A step at the padded `shape` on `layers` layers (default all), with the head (its rows
        sample) and the fixed step overhead; `rows`: see layer_work."""
        n = self.cfg.num_layers if layers is None else layers
        t = n * self.layer_time(shape, page_size, rows)
        if head:
            t += self.head_time(shape.rows)
        return t + (self.eff.step_overhead_s if overhead else 0.0)

    def link_bandwidth(self, link: str) -> float:
        s, e = self.spec, self.eff.link
        bw = {"d2d": s.nvlink_bandwidth, "host": s.pcie_bandwidth, "network": s.network_bandwidth,
              "local": s.hbm_bandwidth / 2}
        if link not in bw:
            raise ValueError(f"link: {link!r} is not one of {', '.join(bw)}")
        return bw[link] * e

    def transfer_time(self, nbytes: float, link: str) -> float:
        return nbytes / self.link_bandwidth(link) if nbytes else 0.0


# ---- fitting the efficiencies to measured steps ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeasuredStep:
    """One real step: the padded shape it ran at and its seconds (scheduling to tokens on the host);
    `start`: when it started (host seconds; steps timed side by side share one clock)."""

    shape: StepShape
    seconds: float
    start: float = 0.0


def fit_efficiency(cfg: ModelConfig, spec: DeviceSpec, steps: Sequence[MeasuredStep], page_size: int, tp: int = 1,
                   dtype_bytes: int = 4, iterations: int = 20) -> tuple[Efficiency, dict]:
    """Efficiencies and overheads that predict `steps` best (relative error, least squares, every
    padded shape weighing the same however often it ran).

    With each layer's bound (compute or memory) fixed, a step's time is linear in (1/e_c, 1/e_m,
    step overhead, layer overhead); the bound of each layer follows from the efficiencies. So we
    alternate: solve the weighted non-negative least squares for the bounds as they are, re-derive
    the bounds, until they no longer change. Returns the efficiencies and the fit's figures (mean
    and P90 absolute % error on the steps, and on every other step when fitted on the rest)."""
    if len(steps) < 8:
        raise ValueError(f"steps: at least 8 measured steps are needed, got {len(steps)}")
    L = cfg.num_layers

    def design(sub, eff):
        """Per step: seconds at peak of the compute-bound parts, of the memory-bound parts, 1, L."""
        x = np.zeros((len(sub), 4))
        m = DeviceModel(cfg, Calibration(spec, eff), tp, dtype_bytes)
        for i, s in enumerate(sub):
            parts = [(L, *m.layer_work(s.shape, page_size)), (1, *m.head_work(s.shape.rows))]
            for k, f, b in parts:  # the layers, then the head: the bound that holds at these efficiencies
                f, b = f / spec.flops, b / spec.hbm_bandwidth  # seconds at peak
                if f / eff.compute >= b / eff.memory:
                    x[i, 0] += k * f
                else:
                    x[i, 1] += k * b
            x[i, 2], x[i, 3] = 1.0, L
        return x

    def solve(sub):
        eff = Efficiency(compute=0.5, memory=0.5, link=1.0, step_overhead_s=0.0, layer_overhead_s=0.0,
                         allreduce_latency_s=0.0)
        y = np.array([s.seconds for s in sub])
        count: dict = {}
        for s in sub:
            count[s.shape] = count.get(s.shape, 0) + 1
        w = np.sqrt(np.array([1.0 / count[s.shape] for s in sub]))  # every shape weighs the same in all
        for _ in range(iterations):
            coef = nonnegative_lstsq(design(sub, eff) * (w / y)[:, None], w)
            inv = [min(MAX_EFFICIENCY, 1.0 / c) if c > 0 else MAX_EFFICIENCY for c in coef[:2]]
            new = dataclasses.replace(eff, compute=inv[0], memory=inv[1],
                                      step_overhead_s=float(coef[2]), layer_overhead_s=float(coef[3]))
            if new == eff:
                break
            eff = new
        return eff

    def errors(eff, sub):
        m = DeviceModel(cfg, Calibration(spec, eff), tp, dtype_bytes)
        return np.array([abs(m.step_time(s.shape, page_size) - s.seconds) / s.seconds * 100 for s in sub])

    eff = solve(steps)
    err = errors(eff, steps)
    held_err = errors(solve(list(steps[0::2])), list(steps[1::2]))
    pre = np.array([s.shape.prefill for s in steps])
    eff = Efficiency(**{k: float(v) for k, v in dataclasses.asdict(eff).items()})
    return eff, {"steps": len(steps), "mean_abs_pct_error": float(err.mean()),
                 "p90_abs_pct_error": float(np.percentile(err, 90)),
                 "prefill_mean_abs_pct_error": float(err[pre].mean()) if pre.any() else None,
                 "decode_mean_abs_pct_error": float(err[~pre].mean()) if (~pre).any() else None,
                 "held_out_mean_abs_pct_error": float(held_err.mean()),
                 "held_out_p90_abs_pct_error": float(np.percentile(held_err, 90)),
                 "samples": [[s.shape.rows, s.shape.query, s.shape.pages, round(s.seconds, 6)] for s in steps]}
