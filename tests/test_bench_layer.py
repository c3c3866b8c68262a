"""The layer benchmark's host-side logic (nf4moe/benchmarks/layer.py, no GPU): eager rounds alternate the
implementations, and the table shows each round beside the median; bench/'s entry points run it."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from nf4moe.benchmarks import layer as bench_layer


def test_rounds_alternate_the_implementations(monkeypatch):
    rng = random.Random()
    calls = []
    times = {name: [rng.uniform(0.1, 2.0) for _ in range(4)] for name in ("a", "b", "c")}

    def fake_bench(fn, *, rep_ms):
        name = fn()
        calls.append((name, rep_ms))
        return times[name][sum(1 for c in calls if c[0] == name) - 1]

    monkeypatch.setattr(bench_layer, "_bench", fake_bench)
    got = bench_layer.rounds_ms({n: (lambda n=n: n) for n in ("a", "b", "c")}, rounds=4, rep_ms=200)
    assert [c[0] for c in calls] == ["a", "b", "c"] * 4
    assert {c[1] for c in calls} == {50}
    assert got == times


def test_markdown_shows_rounds_and_ratios():
    env = {"gpu": "G", "torch": "t", "triton": "tr", "transformers": "x", "bitsandbytes": "b", "peft": "p",
           "date": "d"}
    ceil = {"copy_bytes_per_s": 3e12, "bf16_flops_per_s": 7e14}
    peer = bench_layer.Row("qwen3", "fwd", 16, "transformers grouped_mm bf16", 0.4, 0.1, rounds_ms=[0.41, 0.4, 0.39])
    ours = bench_layer.Row("qwen3", "fwd", 16, "nf4moe (LoRA r=16)", 0.2, 0.1, 1e-3, rounds_ms=[0.25, 0.2, 0.19])
    graph = bench_layer.Row("qwen3", "fwd", 16, "nf4moe (LoRA r=16) [CUDA graph]", 0.19, 0.1)
    text = bench_layer.markdown([peer, ours, graph], env, ceil)
    lines = {line.split("|")[4].strip(): line for line in text.splitlines() if line.startswith("| qwen3")}
    assert "| 2.00x |" in lines["transformers grouped_mm bf16"]
    assert lines["transformers grouped_mm bf16"].endswith("| 0.410 / 0.400 / 0.390 |")
    assert lines["nf4moe (LoRA r=16)"].endswith("| 0.250 / 0.200 / 0.190 |")
    assert lines["nf4moe (LoRA r=16) [CUDA graph]"].endswith("|  |")


def test_checkout_entry_points_run_the_packaged_benchmark(monkeypatch):
    import runpy

    calls = []
    monkeypatch.setattr(bench_layer, "main", lambda argv=None: calls.append(argv) or 0)
    root = Path(__file__).resolve().parent.parent / "bench"
    for script, argv in (("bench_layer.py", None), ("bench_train.py", ["--mode", "fwdbwd", "--tokens", "1024"])):
        monkeypatch.setattr(sys, "argv", [script, "--tokens", "1024"])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(root / script), run_name="__main__")
        assert exc.value.code == 0
        assert calls.pop() == argv
