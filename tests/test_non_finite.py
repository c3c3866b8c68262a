"""Non-finite weights are refused at quantization and at bitsandbytes load, unless the caller opts out.

Why refuse: NF4 has no NaN / Inf code, and with double quantization the nested statistics (one offset,
the mean absmax, for the whole tensor) are shared by every expert, so one NaN in one expert turns every
token's output NaN with nothing saying why (issue 33).  The error names the weight (module path when
known), each expert holding one and the counts.
"""
from __future__ import annotations

import re

import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers

import nf4moe
from nf4moe import NF4Weight, QuantGroupedExperts
from nf4moe.adapters.replace import quant_experts
from nf4moe.moe_layers import nf4_weight

NAN, INF = float("nan"), float("inf")


def weights(shape=(4, 64, 128), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype)


def poisoned(shape=(4, 64, 128), dtype=torch.bfloat16, expert=2):
    w = weights(shape, dtype)
    w[expert, 3, 7] = NAN
    w[expert, 10, 64] = -INF
    return w


def tiny_qwen3_moe(dtype=torch.float32):
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=128, intermediate_size=256, moe_intermediate_size=192,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      num_experts=8, num_experts_per_tok=2)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_quantize_refuses_nan_and_inf_naming_expert_and_counts(compress_statistics, dtype):
    w = poisoned(dtype=dtype)
    msg = re.escape("w (4, 64, 128) has 2 non-finite values (1 NaN, 1 Inf) in 1 of 4 experts: "
                    "expert 2 (2 values: 1 NaN, 1 Inf)")
    with pytest.raises(ValueError, match=msg + ".*allow_non_finite=True"):
        NF4Weight.quantize(w, 64, compress_statistics)


def test_quantize_counts_every_expert_across_chunks(monkeypatch):
    # One expert per bitsandbytes call (a chunk of 64 * 128 elements): the flag and the counts cross chunks.
    monkeypatch.setattr(nf4_weight, "_CHUNK_ELEMENTS", 64 * 128)
    w = weights((12, 64, 128))
    for e in range(1, 12):  # eleven experts, one to three NaN each, plus one Inf in the last
        w[e, :1 + e % 3, 0] = NAN
    w[11, 5, 5] = INF
    with pytest.raises(ValueError) as err:
        NF4Weight.quantize(w, 64, True, name="layers.0.experts.gate_up_proj")
    text = str(err.value)
    assert text.startswith("layers.0.experts.gate_up_proj (12, 64, 128) has 24 non-finite values (23 NaN, 1 Inf) "
                           "in 11 of 12 experts: expert 1 (2 values: 2 NaN, 0 Inf), expert 2 (3 values: 3 NaN, 0 Inf)")
    assert "expert 8 (3 values: 3 NaN, 0 Inf), and 3 more." in text and "expert 0 " not in text


def test_quantize_happy_path_builds_no_message(monkeypatch):
    def fail(*args):
        raise AssertionError("the per-expert counts ran on finite weights")

    monkeypatch.setattr(nf4_weight, "_non_finite_weight_message", fail)
    monkeypatch.setattr(nf4_weight, "_CHUNK_ELEMENTS", 64 * 128)  # several chunks
    NF4Weight.quantize(weights((5, 64, 128)), 64, True)


def test_quantize_opt_out_keeps_other_experts_without_double_quant():
    w = poisoned()
    m = NF4Weight.quantize(w, 64, False, allow_non_finite=True)
    clean = w.clone()
    clean[2] = weights()[2]
    ref = NF4Weight.quantize(clean, 64, False)
    for e in (0, 1, 3):  # plain absmax is per block: the other experts' bytes and scales are untouched
        assert torch.equal(m.packed[e], ref.packed[e]) and torch.equal(m.absmax[e], ref.absmax[e])
    assert not torch.isfinite(m.scales()[2]).all()


def test_quantize_opt_out_with_double_quant_poisons_every_expert():
    # What the refusal prevents: the shared nested offset makes every expert's scales NaN.
    m = NF4Weight.quantize(poisoned(), 64, True, allow_non_finite=True)
    assert torch.isnan(m.scales()).flatten(1).all(dim=1).tolist() == [True] * 4


@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_from_weights_names_the_weight(which):
    gu, dn = weights((3, 256, 64), seed=1), weights((3, 64, 128), seed=2)
    bad = {"gate_up_proj": gu, "down_proj": dn}[which]
    bad[1, 0, 0] = INF
    with pytest.raises(ValueError, match=re.escape(f"{which} {tuple(bad.shape)} has 1 non-finite values (0 NaN, 1 Inf) "
                                                   "in 1 of 3 experts: expert 1 (1 values: 0 NaN, 1 Inf)")):
        QuantGroupedExperts.from_weights(gu, dn, backend="reference")
    m = QuantGroupedExperts.from_weights(gu, dn, backend="reference", compress_statistics=False, allow_non_finite=True)
    assert m.num_experts == 3


# ---------------------------------------------------------------------------------------------- bitsandbytes state
def bnb_state(compress_statistics, shape=(4, 64, 128)):
    return bnbf.quantize_4bit(weights(shape), blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")


def test_from_bnb_refuses_poisoned_absmax():
    q, qs = bnb_state(False)
    qs.absmax.view(4, -1)[3, 5] = NAN  # expert 3's sixth block
    with pytest.raises(ValueError, match=re.escape("experts.down_proj: bitsandbytes NF4 statistics hold non-finite "
                                                   "values (absmax 1 of 512); they make the block scales of 1 of 4 "
                                                   "experts: expert 3 (1 blocks) non-finite")):
        NF4Weight.from_bnb(q, qs, name="experts.down_proj")
    m = NF4Weight.from_bnb(q, qs, allow_non_finite=True)
    assert torch.isnan(m.scales()).sum() == 1


@pytest.mark.parametrize("field", ["absmax2", "offset", "code2"])
def test_from_bnb_refuses_poisoned_nested_statistics(field):
    q, qs = bnb_state(True, shape=(4, 64, 512))  # 2048 blocks: 8 nested blocks of 256, two per expert
    if field == "absmax2":
        qs.state2.absmax[5] = INF  # nested block 5: blocks 1280..1535, expert 2 (blocks 1024..1535)
        expect = "absmax2 1 of 8); they make the block scales of 1 of 4 experts: expert 2 (256 blocks)"
    elif field == "offset":
        qs.offset = torch.tensor(NAN)
        expect = "offset 1 of 1); they make the block scales of 4 of 4 experts: expert 0 (512 blocks)"
    else:
        used = int(qs.absmax[0])  # the code of block 0: used there and maybe elsewhere
        qs.state2.code[used] = NAN
        expect = "code2 1 of 256); they make the block scales of "
    with pytest.raises(ValueError, match=re.escape(f"quant_state: bitsandbytes NF4 statistics hold non-finite values "
                                                   f"({expect}")):
        NF4Weight.from_bnb(q, qs)


def test_from_bnb_unused_code2_entry_still_refused():
    q, qs = bnb_state(True)
    unused = sorted(set(range(256)) - set(qs.absmax.tolist()))[0]
    qs.state2.code[unused] = INF
    with pytest.raises(ValueError, match="code2 1 of 256\\); no block's scale uses them, but the state is corrupt"):
        NF4Weight.from_bnb(q, qs)


def test_load_bnb_experts_refuses_poisoned_absmax():
    model = tiny_qwen3_moe()
    sd = dict(model.state_dict())
    for key in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        q, qs = bnbf.quantize_4bit(sd.pop(key).contiguous(), blocksize=64, compress_statistics=False,
                                   quant_type="nf4")
        if key == "model.layers.1.mlp.experts.down_proj":
            qs.absmax[-1] = INF  # the last expert's last block
        sd[key] = q
        sd.update({f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()})
    with pytest.raises(ValueError, match=re.escape("hold non-finite values (absmax 1 of 3072); they make the block "
                                                   "scales of 1 of 8 experts: expert 7 (1 blocks) non-finite")):
        nf4moe.load_bnb_experts(model, sd, backend="reference")


# ---------------------------------------------------------------------------------------------- models
def test_replace_experts_names_the_module_path():
    model = tiny_qwen3_moe()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[5, 100, 3] = NAN
    msg = "model.layers.1.mlp.experts.down_proj (8, 128, 192) has 1 non-finite values (1 NaN, 0 Inf) in 1 of 8 experts: "
    with pytest.raises(ValueError, match=re.escape(msg + "expert 5 (1 values")):
        nf4moe.replace_experts(model, lora_rank=0, backend="reference")


def test_replace_experts_opt_out():
    model = tiny_qwen3_moe()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[0, 0, 0] = INF
    nf4moe.replace_experts(model, lora_rank=0, backend="reference", allow_non_finite=True)
    assert len(quant_experts(model)) == 2


def test_quantize_at_load_refuses(tmp_path):
    model = tiny_qwen3_moe(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[4, 1, 2] = NAN
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.experts.gate_up_proj (8, 384, 128) has 1 "
                                                   "non-finite values (1 NaN, 0 Inf) in 1 of 8 experts: expert 4 "
                                                   "(1 values: 1 NaN, 0 Inf)")):
        nf4moe.from_pretrained(tmp_path, backend="reference")
    loaded = nf4moe.from_pretrained(tmp_path, backend="reference", allow_non_finite=True)
    assert len(quant_experts(loaded)) == 2
