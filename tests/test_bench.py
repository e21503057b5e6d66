"""The workload-A benchmark runs on the CPU (tiny dummy model) with its transformers peer."""

from __future__ import annotations

import json

from paged_backend.cli import main


def test_bench_cli_on_cpu_with_hf_peer(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["bench", "--model", "tiny", "--num-prompts", "6", "--output-len", "8", "--min-input-len", "5",
          "--max-input-len", "40", "--device", "cpu", "--peer", "hf", "--json", str(out)])
    data = json.loads(out.read_text())
    ours, peer = data["results"]
    assert ours["output_tokens"] == peer["output_tokens"] == 6 * 8
    assert ours["seconds"] > 0 and peer["seconds"] > 0
    printed = capsys.readouterr().out
    assert "paged-backend" in printed and "transformers generate" in printed
