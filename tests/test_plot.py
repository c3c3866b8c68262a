"""`python -m nf4moe plot`: PNG plots from benchmark JSON (layer rows and end-to-end rows), on fresh random results."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from nf4moe import plot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"date": "2026-01-01", "gpu": "Test GPU", "torch": "x", "triton": "y", "transformers": "z",
       "bitsandbytes": "b", "peft": "p"}


def layer_doc(rng: random.Random) -> dict:
    rows = []
    for shape in ("qwen3", "dsv3", "custom"):
        for t in (1, 16, 1024, 8192):
            floor = rng.uniform(0.01, 1.0) * t ** 0.5
            for impl in ("transformers grouped_mm bf16", "dequant(bnb) + grouped_mm", "nf4moe (LoRA r=16)",
                         "something else"):
                rows.append(dict(shape=shape, mode="fwd", tokens=t, impl=impl, ms=floor * rng.uniform(1.5, 20),
                                 floor_ms=floor, rel_err=None, extra_mem_gib=None, note=""))
            if t == 1:
                rows.append(dict(shape=shape, mode="fwd", tokens=t, impl="nf4moe (LoRA r=16) [CUDA graph]",
                                 ms=floor * 2, floor_ms=floor, rel_err=None, extra_mem_gib=None, note=""))
            if t >= 1024:
                for impl in ("PEFT LoRA r=16 on bf16 grouped_mm", "nf4moe (LoRA r=16)"):
                    rows.append(dict(shape=shape, mode="fwdbwd", tokens=t, impl=impl, ms=floor * rng.uniform(2, 9),
                                     floor_ms=floor, rel_err=None, extra_mem_gib=rng.uniform(0.1, 9), note=""))
    return {"env": ENV, "ceilings": {}, "rows": rows}


def e2e_doc(rng: random.Random) -> dict:
    reduced = [dict(part="reduced", impl=impl, layers=4, rank=16, seq=2048, batch=1, steps=8,
                    tokens_per_s=rng.uniform(500, 9000), step_ms=100.0, peak_mem_gib=rng.uniform(5, 40),
                    weights_gib=3.0, optimizer="torch AdamW", grad_ckpt=False, status="ok", note="", extra={})
               for impl in ("transformers + bitsandbytes + PEFT (bf16 experts)", "dequantize(bnb) + grouped_mm",
                            "nf4moe")]
    reduced.append({**reduced[0], "impl": "an OOM peer", "status": "OOM", "tokens_per_s": None, "peak_mem_gib": None})
    full = [dict(part="full", impl=f"nf4moe r={r}", layers=48, rank=r, seq=2048, batch=1, steps=2,
                 tokens_per_s=rng.uniform(500, 3000), step_ms=900.0, peak_mem_gib=rng.uniform(16, 26),
                 weights_gib=15.5, optimizer="bitsandbytes AdamW8bit", grad_ckpt=True, status="ok", note="",
                 extra={"nf4_experts_gib": 14.0}) for r in (8, 16)]
    return {"kind": "e2e", "env": ENV, "budget_gib": 24.0, "rows": reduced + full}


def check_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 20_000, path


def test_plot_layer_and_e2e_files(tmp_path, capsys):
    rng = random.Random()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "layers.json").write_text(json.dumps(layer_doc(rng)))
    (tmp_path / "in" / "e2e.json").write_text(json.dumps(e2e_doc(rng)))
    assert plot.main([str(tmp_path / "in"), "--out", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["e2e_e2e.png", "layers_fwd_time.png", "layers_fwdbwd_memory.png", "layers_fwdbwd_time.png"]
    for name in names:
        check_png(tmp_path / "png" / name)
    assert capsys.readouterr().out.count("wrote ") == 4


def test_plot_checked_in_results(tmp_path):
    results = sorted((ROOT / "bench" / "results").glob("layer_*.json"))
    if not results:
        pytest.skip("no layer results in bench/results")
    assert plot.main([str(results[0]), "--out", str(tmp_path)]) == 0
    for png in tmp_path.iterdir():
        check_png(png)


def test_plot_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        plot.main([str(tmp_path / "nope.json")])
    with pytest.raises(SystemExit, match="no JSON files"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "x.json").write_text(json.dumps({"rows": [{"a": 1}]}))
    with pytest.raises(ValueError, match="no layer rows"):
        plot.main([str(tmp_path / "x.json"), "--out", str(tmp_path / "o")])


def test_tokens_label():
    assert [plot.tokens_label(t) for t in (1, 16, 128, 1000, 1024, 8192, 16384)] == \
        ["1", "16", "128", "1,000", "1k", "8k", "16k"]
