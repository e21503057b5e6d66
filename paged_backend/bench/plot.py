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
