"""bench/bench_e2e.py (a GPU benchmark): imports and parses on a CPU, and every code path runs on a toy
config of the same architecture (--tiny --device cpu): the three reduced-depth peers and the layer-by-layer
NF4 build of the full model with 8-bit AdamW and gradient checkpointing."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e_under_test", ROOT / "bench" / "bench_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_help_and_real_config(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--part", "--quick", "--full-ranks", "--out", "--tiny"):
        assert flag in text
    cfg = bench.make_config(48, tiny=False)
    assert (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.vocab_size,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2048, 128, 768, 8, 151936, 32, 4, 128)


def test_refuses_cpu_without_tiny(bench, capsys):
    assert bench.main(["--device", "cpu", "--part", "reduced"]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_tiny_smoke_both_parts(bench, tmp_path, capsys):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    assert bench.main(["--tiny", "--device", "cpu", "--quick", "--seed", str(seed), "--out", str(tmp_path)]) == 0
    reduced = json.loads((tmp_path / "e2e_reduced.json").read_text())
    full = json.loads((tmp_path / "e2e_full.json").read_text())
    assert reduced["kind"] == full["kind"] == "e2e" and reduced["config"]["tiny"]
    rows = reduced["rows"]
    assert [r["impl"] for r in rows] == list(bench.IMPLS.values())
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert r["extra"]["trainable"] > 0
    # Same random weights in all three: the first losses agree up to the NF4 rounding of the experts.
    first = [r["extra"]["losses"][0] for r in rows]
    assert max(first) - min(first) < 0.05, first
    # nf4moe and the dequantize path hold the same NF4 experts and the same LoRA parameters.
    assert rows[1]["extra"]["trainable"] == rows[2]["extra"]["trainable"]
    frows = full["rows"]
    assert [(r["rank"], r["extra"]["loss"]) for r in frows] == [(8, "chunked"), (8, "model"), (16, "chunked"),
                                                               (16, "model")]
    assert all(r["status"] == "ok" and r["grad_ckpt"] and r["optimizer"] == "bitsandbytes AdamW8bit" for r in frows)
    assert frows[2]["extra"]["trainable"] > frows[0]["extra"]["trainable"]
    # Fresh LoRA (B = 0) for every measurement: the first loss is the base model's, whichever rank, and the
    # chunked loss equals transformers' own.
    first = [r["extra"]["losses"][0] for r in frows]
    assert max(first) - min(first) < 1e-3 * first[0], first
    md = (tmp_path / "e2e_reduced.md").read_text()
    assert "TOY CONFIG" in md and "| nf4moe |" in md


def test_full_build_never_holds_the_dense_model(bench):
    """Layer-by-layer build: every expert module becomes NF4, nothing stays on meta, the shells hold no storage."""
    import nf4moe

    cfg = bench.make_config(3, tiny=True)
    model = bench.build_full_nf4(cfg, torch.device("cpu"), "reference", seed=1, log=lambda m: None)
    qes = [m for m in model.modules() if isinstance(m, nf4moe.QuantGroupedExperts)]
    assert len(qes) == 3
    dense_expert_params = [n for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
                           and ".lora_" not in n]
    assert dense_expert_params == []
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 3 * 4
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and out.float().std() > 0
