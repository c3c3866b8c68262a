"""nf4moe.adapters: unsupported layouts fail loudly, module selection, bitsandbytes checkpoints bit-exact,
ambiguous PEFT layouts, the ExpertsInterface entry and the supported-model listing (CPU, reference backend)."""
from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import nf4moe
from nf4moe import QuantGroupedExperts
from nf4moe.adapters import UNSUPPORTED_FLAGS, UnsupportedExpertsError
from nf4moe.adapters.replace import quant_experts
from nf4moe.adapters.table import recorded_flags

moe = pytest.importorskip("transformers.integrations.moe")
use_experts_implementation = moe.use_experts_implementation


def qwen3_moe(hidden=128, inter=192, layers=2, dtype=torch.float32, **kw):
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=hidden, intermediate_size=256,
                                      moe_intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------------------------- toy classes
def toy_experts_class(*, gate=None, extra_param=False, act=None, **flags):
    """A transformers-style expert class decorated with the given flags (stored (E, out, in) unless transposed)."""

    class ToyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            e, h, i = 4, 64, 64
            gu, dn = ((e, h, 2 * i), (e, i, h)) if flags.get("is_transposed") else ((e, 2 * i, h), (e, h, i))
            self.num_experts = e
            self.gate_up_proj = nn.Parameter(torch.randn(gu) * 0.05)
            self.down_proj = nn.Parameter(torch.randn(dn) * 0.05)
            if extra_param:
                self.expert_scale = nn.Parameter(torch.ones(e))
            self.act_fn = act if act is not None else nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("not called in these tests")

    if gate is not None:
        ToyExperts._apply_gate = gate
    return use_experts_implementation(**flags)(ToyExperts)


def toy_model(experts_cls, n=2):
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(n):
        block = nn.Module()
        block.experts = experts_cls(SimpleNamespace(_experts_implementation="eager"))
        block.router = nn.Linear(64, 4)
        model.layers.append(block)
    return model


def assert_untouched(model, cls):
    for layer in model.layers:
        assert type(layer.experts) is cls
        assert layer.experts.gate_up_proj.device.type != "meta"


@pytest.mark.parametrize("flag_value", [fv for fv in sorted(UNSUPPORTED_FLAGS) if fv[0] in recorded_flags()],
                         ids=lambda fv: f"{fv[0]}={fv[1]}")
def test_unsupported_flag_raises_naming_class_and_flag(flag_value):
    flag, value = flag_value
    cls = toy_experts_class(**{flag: value})
    model = toy_model(cls)
    with pytest.raises(UnsupportedExpertsError, match=rf"ToyExperts at 'layers\.0\.experts'.*{flag}={value}"):
        nf4moe.replace_experts(model, backend="reference")
    assert_untouched(model, cls)  # nothing replaced before the check failed


@pytest.mark.parametrize("what,kwargs,pattern", [
    ("custom gate", dict(gate=lambda self, x: x[..., ::2]), "custom _apply_gate"),
    ("extra parameter", dict(extra_param=True), r"extra parameters \['expert_scale'\]"),
    ("activation", dict(act=nn.Tanh()), "activation Tanh"),
])
def test_unsupported_module_content_raises(what, kwargs, pattern):
    cls = toy_experts_class(**kwargs)
    model = toy_model(cls)
    with pytest.raises(UnsupportedExpertsError, match=pattern):
        nf4moe.replace_experts(model, backend="reference")
    assert_untouched(model, cls)


def test_only_unsupported_modules_outside_the_filter_are_allowed():
    model = toy_model(toy_experts_class())
    model.layers.append(toy_model(toy_experts_class(has_bias=True), n=1).layers[0])
    with pytest.raises(UnsupportedExpertsError, match="has_bias=True"):
        nf4moe.replace_experts(model, backend="reference")
    nf4moe.replace_experts(model, modules=r"layers\.[01]\.", backend="reference")
    assert [type(layer.experts).__name__ for layer in model.layers] == ["QuantGroupedExperts"] * 2 + ["ToyExperts"]


@pytest.mark.parametrize("transposed", [False, True])
def test_toy_supported_layouts_replace_and_merge_back(transposed):
    cls = toy_experts_class(is_transposed=transposed)
    model = toy_model(cls)
    original = [layer.experts.gate_up_proj.detach().clone() for layer in model.layers]
    nf4moe.replace_experts(model, lora_rank=0, backend="reference")
    assert all(isinstance(layer.experts, QuantGroupedExperts) for layer in model.layers)
    nf4moe.merge_and_unload(model, dtype=torch.float32)
    for layer, w in zip(model.layers, original):
        assert type(layer.experts) is cls and layer.experts.is_transposed == transposed
        # NF4 keeps ~3 bits of relative precision; an orientation error would be O(1).
        assert ((layer.experts.gate_up_proj - w).norm() / w.norm()) < 0.15


def test_flags_an_older_decorator_does_not_record_read_as_default(monkeypatch):
    # transformers 5.17 records no has_post_expert_norm: its classes are decorated all the same.
    model = toy_model(toy_experts_class())
    for layer in model.layers:
        if hasattr(layer.experts, "has_post_expert_norm"):
            del layer.experts.has_post_expert_norm
    if "has_post_expert_norm" in recorded_flags():  # this transformers records it: without it, not decorated
        assert not nf4moe.adapters.table.is_experts_module(model.layers[0].experts)
    monkeypatch.setattr(nf4moe.adapters.table, "_RECORDED",
                        tuple(f for f in recorded_flags() if f != "has_post_expert_norm"))
    nf4moe.replace_experts(model, backend="reference")
    assert all(isinstance(layer.experts, QuantGroupedExperts) for layer in model.layers)


def tiny_gpt_oss():
    """One gpt-oss layer, 4 experts (H = I = 128): interleaved transposed weights, biases, its clamped gate."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("no GPT-OSS in this transformers")
    cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                                    num_experts_per_tok=2)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def test_gpt_oss_swaps_with_its_gate_biases_and_interleaving():
    model = tiny_gpt_oss()
    dense = model.model.layers[0].mlp.experts
    nf4moe.replace_experts(model, backend="reference")
    qe = model.model.layers[0].mlp.experts
    assert isinstance(qe, QuantGroupedExperts) and qe.nf4moe_origin.layout.name == "interleaved_transposed"
    assert qe.gate == nf4moe.reference.Gate("silu", alpha=dense.alpha, gate_limit=dense.limit, up_limit=dense.limit,
                                            up_offset=1.0)
    assert qe.gate_up_bias.shape == (4, 256) and qe.down_bias.shape == (4, 128) and not qe.gate_up_bias.requires_grad
    assert not qe.kernel_ready
    qe.backend = "triton"
    with pytest.raises(NotImplementedError, match=r"Triton kernels do not compute the gate min\(g, 7\)"):  # limit 7
        qe(torch.randn(3, 128), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_gpt_oss_biases_train_when_asked():
    model = nf4moe.replace_experts(tiny_gpt_oss(), lora_rank=2, backend="reference", train_biases=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.0.mlp.experts.{k}" for k in (
        "lora_A.gate_up_proj", "lora_A.down_proj", "lora_B.gate_up_proj", "lora_B.down_proj", "gate_up_bias",
        "down_bias")}
    ids = torch.randint(0, 96, (2, 7))
    model(ids, labels=ids).loss.backward()
    qe = model.model.layers[0].mlp.experts
    assert qe.gate_up_bias.grad is not None and qe.gate_up_bias.grad.abs().sum() > 0
    assert qe.down_bias.grad is not None and qe.down_bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expert biases of \['model.layers.0.mlp.experts'\] are trainable"):
        nf4moe.save_adapter(model, "/nonexistent")  # a PEFT adapter would drop them


def test_a_gate_nf4moe_cannot_describe_is_refused_naming_the_class():
    base = qwen3_moe()

    class SoftcapExperts(type(base.model.layers[0].mlp.experts)):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.tanh(gate) * up

    layer = base.model.layers[0].mlp
    dense = layer.experts
    layer.experts = SoftcapExperts(base.config)
    layer.experts.load_state_dict(dense.state_dict())
    with pytest.raises(UnsupportedExpertsError, match=r"SoftcapExperts at 'model.layers.0.mlp.experts' cannot be "
                                                      r"replaced.*custom _apply_gate: the class's _apply_gate matches "
                                                      r"no nf4moe gate form"):
        nf4moe.replace_experts(base, backend="reference")
    assert type(layer.experts) is SoftcapExperts, "nothing was replaced"


def test_undecorated_stacked_experts_raise():
    class LegacyExperts(nn.Module):  # 3-D expert weights, no @use_experts_implementation flags
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 64, 128))
            self.down_proj = nn.Parameter(torch.randn(4, 64, 64))

    model = nn.Module()
    model.experts = LegacyExperts()
    with pytest.raises(UnsupportedExpertsError, match="LegacyExperts at 'experts'.*no @use_experts_implementation"):
        nf4moe.replace_experts(model, backend="reference")


def test_model_without_experts_raises():
    cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has no expert modules"):
        nf4moe.replace_experts(model, backend="reference")


def test_replacing_twice_and_unmatched_filter_raise():
    model = nf4moe.replace_experts(qwen3_moe(), backend="reference")
    with pytest.raises(ValueError, match="already holds 2 QuantGroupedExperts"):
        nf4moe.replace_experts(model, backend="reference")
    with pytest.raises(ValueError, match="no expert module matches modules='nothing'"):
        nf4moe.replace_experts(qwen3_moe(), modules="nothing", backend="reference")


@pytest.mark.parametrize("modules,replaced", [
    ("*layers.1.*", [1]),  # glob
    (r"layers\.0\.mlp", [0]),  # regex
    (["*layers.0.*", "*layers.1.*"], [0, 1]),
    (lambda name, module: name.startswith("model.layers.1"), [1]),
])
def test_modules_filter(modules, replaced):
    model = nf4moe.replace_experts(qwen3_moe(), modules=modules, backend="reference")
    got = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp.experts, QuantGroupedExperts)]
    assert got == replaced


def test_blocksize_mismatch_raises_before_any_change():
    model = qwen3_moe(inter=96)
    with pytest.raises(ValueError, match="intermediate_size 96 is not a multiple of blocksize 64"):
        nf4moe.replace_experts(model, backend="reference")
    assert not quant_experts(model)
    nf4moe.replace_experts(model, blocksize=32, backend="reference")  # a bitsandbytes blocksize that divides 96
    assert len(quant_experts(model)) == 2


# ---------------------------------------------------------------------------------------------- bitsandbytes
def bnb_state_dict(model, compress_statistics):
    """The model's state dict with expert weights as bitsandbytes NF4 (packed uint8 + QuantState.as_dict(packed=True))."""
    import bitsandbytes.functional as bnbf

    sd, reference = {}, {}
    experts = {n for n, m in model.named_modules() if hasattr(m, "has_gate")}
    for key, t in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if module in experts and param in ("gate_up_proj", "down_proj"):
            q, qs = bnbf.quantize_4bit(t.contiguous(), blocksize=64, compress_statistics=compress_statistics,
                                       quant_type="nf4")
            sd[key] = q
            sd.update({f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()})
            reference[key] = (q, bnbf.dequantize_4bit(q, qs))
        else:
            sd[key] = t
    return sd, reference


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_bitsandbytes_experts_load_bit_exact(compress_statistics, tmp_path):
    base = qwen3_moe(dtype=torch.bfloat16)
    sd, reference = bnb_state_dict(base, compress_statistics)

    model = copy.deepcopy(base)
    nf4moe.load_bnb_experts(model, sd, lora_rank=4, backend="reference")
    for name, qe in quant_experts(model):
        for proj, nf4 in (("gate_up_proj", qe.gate_up_nf4), ("down_proj", qe.down_nf4)):
            q, deq = reference[f"{name}.{proj}"]
            assert nf4.compress_statistics == compress_statistics
            assert torch.equal(nf4.packed.flatten(), q.flatten()), "bytes were re-quantized"
            assert torch.equal(nf4.dequantize(), deq), "dequantized weights differ from bitsandbytes"

    # The same entries in a checkpoint folder: from_pretrained detects them and wraps them the same way.
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight" or not base.config.tie_word_embeddings},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(tmp_path)
    loaded = nf4moe.from_pretrained(tmp_path, lora_rank=4, backend="reference")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if ".lora_" not in k)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        for _, qe in quant_experts(loaded) + quant_experts(model):
            qe.lora_B["gate_up_proj"].zero_()
            qe.lora_B["down_proj"].zero_()
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_bitsandbytes_shape_mismatch_raises():
    base = qwen3_moe()
    other, _ = bnb_state_dict(qwen3_moe(inter=128), True)
    with pytest.raises(ValueError, match=r"has shape \(8, 256, 128\), the module needs \(8, 384, 128\)"):
        nf4moe.load_bnb_experts(base, other, backend="reference")


# ---------------------------------------------------------------------------------------------- checkpoints
def test_restore_keeps_saved_lora_and_rejects_conflicting_override(tmp_path):
    model = nf4moe.replace_experts(qwen3_moe(dtype=torch.bfloat16), lora_rank=4, backend="reference")
    nf4moe.save_pretrained(model, tmp_path / "nf4", max_shard_size="300KB")  # several shards + index
    assert (tmp_path / "nf4" / "model.safetensors.index.json").exists()
    restored = nf4moe.from_pretrained(tmp_path / "nf4", backend="reference")
    assert all(qe.lora_rank == 4 for _, qe in quant_experts(restored))
    with pytest.raises(ValueError, match="lora_rank=8 differs from the checkpoint's 4"):
        nf4moe.from_pretrained(tmp_path / "nf4", lora_rank=8, backend="reference")


def test_plain_save_of_an_nf4_model_round_trips_and_a_stripped_config_is_refused(tmp_path):
    model = nf4moe.replace_experts(qwen3_moe(dtype=torch.bfloat16), lora_rank=4, backend="reference")
    model.save_pretrained(tmp_path)  # transformers' own save, through the quantizer replace_experts attached
    restored = nf4moe.from_pretrained(tmp_path, backend="reference")
    sd, rsd = model.state_dict(), restored.state_dict()
    assert sd.keys() == rsd.keys() and all(torch.equal(sd[k], rsd[k]) for k in sd)
    # config.json without the quantization_config no longer says how to rebuild the modules.
    cfg_path = os.path.join(tmp_path, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    del cfg["quantization_config"]
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match="neither the nf4moe quantization_config nor"):
        nf4moe.from_pretrained(tmp_path, backend="reference")


def test_merge_and_save_need_quant_experts():
    with pytest.raises(ValueError, match="no QuantGroupedExperts to merge"):
        nf4moe.merge_and_unload(qwen3_moe())
    with pytest.raises(ValueError, match="no QuantGroupedExperts"):
        nf4moe.save_pretrained(qwen3_moe(), "/nonexistent")
    with pytest.raises(ValueError, match="lora_rank > 0"):
        nf4moe.save_adapter(nf4moe.replace_experts(qwen3_moe(), lora_rank=0, backend="reference"), "/nonexistent")


# ---------------------------------------------------------------------------------------------- PEFT layouts
def _drop_projection(src, dst, keep: str):
    """Copy a PEFT adapter keeping only one projection (as an adapter trained on that parameter alone)."""
    from safetensors.torch import load_file

    from nf4moe.adapters.peft_io import _peft_nesting

    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    depth = _peft_nesting(("gate_up_proj", "down_proj"), ("gate_up_proj", "down_proj"), False)[keep]
    kept = {k: v for k, v in tensors.items() if k.split(".experts.", 1)[1].startswith(depth + "lora_")}
    # Alone, the parameter is the outermost (only) wrapper.
    kept = {k.replace(".experts." + depth, ".experts."): v for k, v in kept.items()}
    os.makedirs(dst, exist_ok=True)
    save_file(kept, os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(src, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    cfg["target_parameters"] = [t for t in cfg["target_parameters"] if t.endswith(keep)]
    with open(os.path.join(dst, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)


@pytest.mark.parametrize("hidden,inter,square", [(128, 64, "gate_up_proj"), (128, 128, "down_proj")])
def test_square_projection_needs_explicit_layout(hidden, inter, square, tmp_path):
    model = nf4moe.replace_experts(qwen3_moe(hidden=hidden, inter=inter), lora_rank=4, backend="reference")
    with torch.no_grad():
        for _, qe in quant_experts(model):
            for p in qe.lora_B.values():
                p.normal_(0, 0.05)
    nf4moe.save_adapter(model, tmp_path / "both")
    # Both projections present: the non-square one tells the layout.
    fresh = nf4moe.replace_experts(qwen3_moe(hidden=hidden, inter=inter), lora_rank=4, backend="reference")
    assert nf4moe.load_adapter(fresh, tmp_path / "both") == "current"
    # The square projection alone: shapes cannot tell, so the layout must be given.
    _drop_projection(tmp_path / "both", tmp_path / "one", square)
    with pytest.raises(ValueError, match="layout is ambiguous.*layout='current' or layout='legacy'"):
        nf4moe.load_adapter(fresh, tmp_path / "one")
    assert nf4moe.load_adapter(fresh, tmp_path / "one", layout="current") == "current"
    for (_, a), (_, b) in zip(quant_experts(model), quant_experts(fresh)):
        assert torch.equal(a.lora_A[square], b.lora_A[square]) and torch.equal(a.lora_B[square], b.lora_B[square])
        other = "down_proj" if square == "gate_up_proj" else "gate_up_proj"
        assert not b.lora_B[other].any(), "a projection the adapter does not cover must get a zero delta"


def test_load_adapter_rejects_foreign_tensors_unless_not_strict(tmp_path):
    peft = pytest.importorskip("peft")
    base = qwen3_moe()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    model = nf4moe.replace_experts(base, lora_rank=4, backend="reference")
    with pytest.raises(ValueError, match="not LoRA on QuantGroupedExperts.*q_proj"):
        nf4moe.load_adapter(model, tmp_path)
    assert nf4moe.load_adapter(model, tmp_path, strict=False) == "current"


# ---------------------------------------------------------------------------------------------- registry, listing
def test_experts_interface_entry_points_to_from_pretrained():
    if "nf4moe" not in moe.ALL_EXPERTS_FUNCTIONS:
        pytest.skip("this transformers has no ExpertsInterface registry")
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      num_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="nf4moe")
    with pytest.raises(RuntimeError, match=r"nf4moe\.from_pretrained"):
        model(torch.randint(0, 96, (1, 4)))


def test_supported_models_listing_agrees_with_live_inspection():
    rows = {r["experts_class"]: r for r in nf4moe.supported_models()}
    assert rows["Qwen3MoeExperts"]["supported"] and rows["Qwen3MoeExperts"]["layout"] == "default"
    assert rows["DeepseekV3Experts"]["supported"]
    if "NemotronHExperts" in rows:
        assert not rows["NemotronHExperts"]["supported"] and "has_gate=False" in rows["NemotronHExperts"]["reason"]
    if "GptOssExperts" in rows:
        assert rows["GptOssExperts"]["supported"] and rows["GptOssExperts"]["layout"] == "interleaved_transposed"
        assert rows["GptOssExperts"]["activation"] == "min(g, L)·sigmoid(alpha·min(g, L))·(clamp(u, ±L) + 1)"
    if "AriaExperts" in rows:
        assert rows["AriaExperts"]["layout"] == "transposed"
    # The source listing and the check on live modules are the same verdict.
    live = nf4moe.adapters.inspect_experts(qwen3_moe().model.layers[0].mlp.experts)
    assert live.layout.name == rows["Qwen3MoeExperts"]["layout"]
    names = {layout.name for layout in nf4moe.adapters.LAYOUTS}
    assert all(r["layout"] in names | {None} for r in rows.values())


# ---------------------------------------------------------------------------------------------- GPU memory
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_never_holds_the_bf16_experts_on_gpu(tmp_path):
    cfg = transformers.Qwen3MoeConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048,
                                      moe_intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=4)
    base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path)
    sizes = {n: p.numel() * p.element_size() for n, p in base.named_parameters()}
    experts = sum(v for n, v in sizes.items() if ".experts." in n)
    dense = sum(sizes.values())
    one = max(v for n, v in sizes.items() if ".experts." in n)
    del base
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = nf4moe.from_pretrained(tmp_path, device="cuda", lora_rank=16, backend="reference")
    peak = torch.cuda.max_memory_allocated() - start
    final = torch.cuda.memory_allocated() - start
    assert all(qe.gate_up_nf4.packed.is_cuda for _, qe in quant_experts(model))
    # Final = NF4 experts + LoRA + dense non-expert weights.  Peak may add the expert weight in flight and the
    # quantizer's temporaries (a chunk copy, its codes and fp32 absmax): bounded by 3 expert weights, and far
    # below the bf16 experts (6 layers x 201 MB here).
    print(f"bf16 model {dense / 2**20:.0f} MiB (experts {experts / 2**20:.0f}), NF4 model {final / 2**20:.0f} MiB, "
          f"peak {peak / 2**20:.0f} MiB, one expert weight {one / 2**20:.0f} MiB")
    assert peak <= final + 3 * one
    assert peak < 0.5 * dense
