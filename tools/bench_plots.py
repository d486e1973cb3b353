"""The pictures of tools.bench (matplotlib, PNG): TTFT CDF per policy, and one timeline per policy
(arrival rate, queue length, free KV pages, parameter bytes per device, sliding-window P99 TTFT,
with the server's overload events marked on every panel)."""

from __future__ import annotations

import os

import numpy as np

EVENT_COLORS = {"preempt": "tab:red", "swap_out": "tab:orange", "swap_in": "tab:green", "migrate": "tab:purple",
                "redispatch": "tab:pink", "drop": "black", "restore": "tab:blue"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ttft_cdf(path: str, runs) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        xs = np.sort([1e3 * r.ttft for r in run.results if r.ok and r.ttft is not None])
        if len(xs):
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{run.policy} (P99 {np.percentile(xs, 99):.0f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sliding_p99(times: np.ndarray, values: np.ndarray, at: np.ndarray, window: float) -> np.ndarray:
    """P99 of `values` whose `times` fall in (t - window, t], at each t of `at` (NaN when none)."""
    out = np.full(len(at), np.nan)
    for i, t in enumerate(at):
        sel = values[(times > t - window) & (times <= t)]
        if len(sel):
            out[i] = np.percentile(sel, 99)
    return out


def timeline(path: str, run, window: float) -> str:
    plt = _plt()
    fig, axes = plt.subplots(5, 1, figsize=(9, 11), sharex=True)
    sends = np.array([r.send_t for r in run.results if r.send_t is not None])
    end = max([run.duration] + [s["t_s"] for s in run.samples])
    bin_s = max(0.25, end / 80) if end > 0 else 1.0
    if len(sends):
        edges = np.arange(0, end + bin_s, bin_s)
        counts, _ = np.histogram(sends, edges)
        axes[0].step(edges[:-1], counts / bin_s, where="post")
    axes[0].set_ylabel("arrivals/s")
    t = np.array([s["t_s"] for s in run.samples])
    if len(t):
        axes[1].plot(t, [s["waiting"] + s["queued"] for s in run.samples], label="queued")
        axes[1].plot(t, [s["running"] for s in run.samples], label="running")
        axes[1].plot(t, [s["swapped"] for s in run.samples], label="swapped out")
        axes[1].legend(loc="upper right", fontsize=8)
        axes[2].plot(t, [s["pages_free"] for s in run.samples])
        mem = [(s["t_s"], s["weights_bytes_per_device"]) for s in run.samples if s["weights_bytes_per_device"]]
        if mem:
            mt = [m[0] for m in mem]
            per_dev = np.array([m[1] for m in mem], dtype=float) / 2**20
            for d in range(per_dev.shape[1]):
                axes[3].plot(mt, per_dev[:, d], drawstyle="steps-post", label=f"device {d}")
            if per_dev.shape[1] <= 8:
                axes[3].legend(loc="upper right", fontsize=7, ncol=4)
    axes[1].set_ylabel("requests")
    axes[2].set_ylabel("free KV pages")
    axes[3].set_ylabel("parameters\nMiB / device")
    done = [(r.token_times[0], 1e3 * r.ttft) for r in run.results if r.ok and r.ttft is not None]
    if done and len(t):
        ft, v = np.array([d[0] for d in done]), np.array([d[1] for d in done])
        axes[4].plot(t, sliding_p99(ft, v, t, window))
    axes[4].set_ylabel(f"P99 TTFT ms\n({window:g} s window)")
    axes[4].set_xlabel("seconds from the start of the replay")
    seen = set()
    for ev in run.events:
        color = EVENT_COLORS.get(ev["kind"], "gray")
        for ax in axes:
            ax.axvline(ev["t_s"], color=color, alpha=0.35, lw=0.8,
                       label=None if ev["kind"] in seen or ax is not axes[0] else ev["kind"])
        seen.add(ev["kind"])
    if seen:
        axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"{run.policy}: timeline ({len(run.events)} overload events)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(out: str, runs, window: float) -> list[str]:
    ok = [r for r in runs if r.results]
    paths = [ttft_cdf(os.path.join(out, "ttft_cdf.png"), ok)]
    paths += [timeline(os.path.join(out, f"timeline_{r.policy}.png"), r, window) for r in ok]
    return paths
