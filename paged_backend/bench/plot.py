"""The benchmark's PNG: output throughput against the peers, and our tokens/s over the run."""

from __future__ import annotations


def write_plot(path: str, results: list[dict], timeline: list[tuple[float, int]], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'paged-backend[bench]'") from None
    fig, (bars, line) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r.get("peer", "paged-backend") for r in results]
    speeds = [r["output_tokens"] / r["seconds"] for r in results]
    bars.barh(names, speeds, color=["tab:green"] + ["tab:gray"] * (len(results) - 1))
    bars.set_xlabel("output tokens / s")
    bars.set_title("throughput, same run")
    for y, s in enumerate(speeds):
        bars.text(s, y, f" {s:,.0f}", va="center")
    # tokens/s over time: the tokens each step produced, binned by when it ended (50 bins)
    t_end = timeline[-1][0] if timeline else 1.0
    width = max(t_end / 50, 1e-3)
    num_bins = min(50, int(t_end / width)) + 1
    bins = [0] * num_bins
    prev = 0
    for t, tokens in timeline:
        bins[min(int(t / width), num_bins - 1)] += tokens - prev
        prev = tokens
    xs = [(i + 0.5) * width for i in range(num_bins)]
    ys = [count / width for count in bins]
    line.plot(xs, ys, color="tab:green")
    line.set_xlabel("seconds since the first request")
    line.set_ylabel("output tokens / s")
    line.set_title("paged-backend over the run")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_serve_plot(path: str, report: dict) -> None:
    """`bench serve`'s PNG: TTFT, ITL and output tok/s of each server against the achieved request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for (server, levels), color in zip(report["results"].items(), ["tab:green", "tab:gray", "tab:blue"]):
        xs = [s["requests_per_s"] for s in levels]
        for ax, key in zip(axes[:2], ("ttft_s", "itl_s")):
            ax.plot(xs, [s[key]["p50"] * 1e3 for s in levels], "o-", color=color, label=f"{server} p50")
            ax.plot(xs, [s[key]["p99"] * 1e3 for s in levels], "o--", color=color, label=f"{server} p99")
        axes[2].plot(xs, [s["output_tok_per_s"] for s in levels], "o-", color=color, label=server)
    slo = report["slo"]
    for ax, title, limit in zip(axes, ("time to first token (ms)", "inter-token latency (ms)", "output tokens / s"),
                                (slo["ttft_s"] * 1e3, slo["itl_s"] * 1e3, None)):
        ax.set_xlabel("achieved requests / s")
        ax.set_title(title)
        if limit:
            ax.axhline(limit, color="tab:red", linewidth=0.8, linestyle=":", label="SLO")
        ax.legend(fontsize=8)
    fig.suptitle(f"bench serve: {report['model']}, {report['input_len']} -> {report['output_len']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_variants_plot(path: str, reports: list[dict]) -> None:
    """One PNG for several `bench throughput` JSON reports of the same run (e.g. bf16 / fp8 / fp8 + fp8 KV of
    each shape, as paged_backend/bench/gpu_fp8.sh runs them): output tok/s per variant with its speed-up over
    the shape's first report and its own roofline fraction, and each run's tokens/s over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(rep: dict) -> str:
        kv = str(rep["kv_cache_dtype"]).replace("torch.", "")
        kv = "fp8 KV" if "float8" in kv else f"KV {kv}"
        return f"{rep['model']} {rep['quantization'] or 'bf16'} weights, {kv}"

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(14, 0.6 * len(reports) + 3))
    first: dict[str, float] = {}
    names, speeds, notes = [], [], []
    for rep in reports:
        r = rep["results"][0]
        speed = r["output_tokens"] / r["seconds"]
        base = first.setdefault(rep["model"], speed)
        names.append(label(rep))
        speeds.append(speed)
        notes.append(f" {speed:,.0f} ({speed / base:.2f}x, {r['roofline_fraction']:.0%} of its roofline)")
        timeline = rep.get("timeline") or []
        if timeline:
            ts = [t for t, _ in timeline]
            rate = [(n1 - n0) / max(t1 - t0, 1e-6) for (t0, n0), (t1, n1) in zip(timeline, timeline[1:])]
            k = max(1, len(rate) // 50)  # smoothed over ~50 points
            smooth = [sum(rate[i:i + k]) / len(rate[i:i + k]) for i in range(0, len(rate), k)]
            lines.plot(ts[1::k][: len(smooth)], smooth, label=names[-1])
    bars.barh(names, speeds, color="tab:green")
    for y, note in enumerate(notes):
        bars.text(speeds[y], y, note, va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("output tokens / s (workload A)")
    bars.set_xlim(0, max(speeds) * 1.6)
    lines.set_xlabel("seconds since the first request")
    lines.set_ylabel("output tokens / s")
    lines.legend(fontsize=7)
    fig.suptitle(f"bench throughput, one run on {reports[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
