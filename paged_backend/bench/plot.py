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
