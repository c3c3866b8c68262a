"""transformers' own entry points on models with nf4moe experts (issue 34): the quantizer, and a focused set of
transformers' common-model checks, written here against its public API, for the three target families.

- quantize at load: ``AutoModelForCausalLM.from_pretrained(d, quantization_config=Nf4MoeConfig(...))``, equal to
  replace_experts on the loaded dense model, one expert weight dense at a time;
- save / load: ``model.save_pretrained`` then ``AutoModelForCausalLM.from_pretrained``, bit-exact, no missing,
  unexpected or mismatched key in transformers' loading info, safetensors keys the module's own;
- a fresh process: restored after ``import nf4moe``; without it, loading fails (never random experts);
- transformers' weight init never touches NF4 buffers or LoRA; ``.to(dtype)`` / ``.half()`` keep the NF4 bytes;
- generate after reload gives the tokens of the saved model; gradient checkpointing gives the same LoRA grads;
- Trainer ``save_steps`` checkpoints resume to bit-identical NF4 weights and LoRA.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

import nf4moe
from nf4moe.adapters.hf_quantizer import Nf4MoeConfig, Nf4MoeQuantizer
from nf4moe.moe_layers.experts import MARKER_SHAPE
from nf4moe.adapters.replace import quant_experts

from test_adapters import E, H, I, expert_names, ids, logits, make_model, randomize_lora, same_bits

TARGETS = [pytest.param(f, id=f.removesuffix("Config")) for f in ("Qwen3MoeConfig", "Glm4MoeConfig", "DeepseekV3Config")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def swapped(family, seed=0):
    torch.manual_seed(seed)
    model = nf4moe.replace_experts(make_model(family, torch.bfloat16), lora_rank=4, lora_alpha=8, backend="reference")
    randomize_lora(model)
    return model


def nf4_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, qe in quant_experts(model) for k, v in qe.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not same_bits(k, a[k], b[k])]
    assert not bad, f"not bit-exact: {bad[:5]}"


def reference_backend(model):
    for _, qe in quant_experts(model):
        qe.backend = "reference"
    return model


# ---------------------------------------------------------------------------------------------- the quantizer
@pytest.mark.parametrize("family", TARGETS)
def test_quantize_at_load_through_transformers(family, tmp_path):
    base = make_model(family, torch.bfloat16)
    base.save_pretrained(tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", dtype=torch.bfloat16, quantization_config=Nf4MoeConfig(lora_rank=4, lora_alpha=8,
                                                                                   backend="reference"))
    quantizer = model.hf_quantizer
    assert isinstance(quantizer, Nf4MoeQuantizer) and not quantizer.pre_quantized
    assert quantizer.quantized == sorted(expert_names(base))
    assert quantizer.max_inflight_bytes == E * 2 * I * H * 2, "more than one expert weight was dense at a time"
    ref = nf4moe.replace_experts(copy.deepcopy(base), lora_rank=4, lora_alpha=8, backend="reference")
    got, want = nf4_state(model), nf4_state(ref)
    assert_same({k: v for k, v in got.items() if ".lora_A." not in k}, {k: v for k, v in want.items() if ".lora_A." not in k})
    non_expert = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    assert_same(non_expert, {k: v for k, v in ref.state_dict().items() if ".experts." not in k})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad}
    assert model.config.quantization_config.quantized_modules.keys() == set(expert_names(base))


def test_quantize_at_load_selects_modules_and_refuses_bad_config(tmp_path):
    base = make_model("Qwen3MoeConfig", torch.bfloat16)
    base.save_pretrained(tmp_path)
    first = expert_names(base)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=Nf4MoeConfig(lora_rank=0, modules=[first], backend="reference"))
    assert [n for n, _ in quant_experts(model)] == [first]
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Nf4MoeConfig(blocksize=48)
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        Nf4MoeConfig(lora_rank=-1)
    with pytest.raises(TypeError, match=r"unknown arguments \['lora_ranks'\]"):
        Nf4MoeConfig(lora_ranks=4)
    with pytest.raises(ValueError, match="hidden_size 128 is not a multiple of blocksize 256"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Nf4MoeConfig(blocksize=256))


@pytest.mark.parametrize("family", TARGETS)
def test_save_pretrained_then_from_pretrained_is_bit_exact(family, tmp_path):
    model = swapped(family)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as fh:
        qc = json.load(fh)["quantization_config"]
    assert qc["quant_method"] == "nf4moe" and set(qc["quantized_modules"]) == {n for n, _ in quant_experts(model)}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        saved = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    sd = model.state_dict()
    for k, t in sd.items():
        if ".experts." in k and not k.endswith((".gate_up_proj", ".down_proj")):  # not the markers
            assert saved.get(k) == list(t.shape), f"{k} not saved under the module's own name"
    for name, qe in quant_experts(model):
        assert tuple(qe.gate_up_proj.shape) == tuple(qe.down_proj.shape) == MARKER_SHAPE
        assert bytes(qe.gate_up_proj.flatten().tolist()) == b"nf4moe" * 4
    markers = [k for k in saved if k.split(".experts.", 1)[-1].split(".")[0] not in (
        "gate_up_nf4", "down_nf4", "lora_A", "lora_B") and ".experts." in k]
    assert markers, "the markers that stop a transformers without nf4moe are missing"
    restored, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same(sd, restored.state_dict())
    x = ids()
    assert torch.equal(logits(model, x), logits(reference_backend(restored), x))
    # a second round trip writes the same tensors (nothing accumulates, nothing is renamed)
    restored.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), framework="pt") as fh:
        assert {k: fh.get_slice(k).get_shape() for k in fh.keys()} == saved


def test_reload_in_another_dtype_casts_lora_keeps_nf4(tmp_path):
    model = swapped("Qwen3MoeConfig")  # bf16
    model.save_pretrained(tmp_path)
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
    got, want = nf4_state(half), nf4_state(model)
    for k, t in got.items():
        if "_nf4." in k or k.endswith(("gate_up_proj", "down_proj")):
            assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k  # NF4 bytes and fp32 statistics as saved
        else:
            assert t.dtype == torch.float16 and torch.equal(t, want[k].to(torch.float16)), k  # LoRA as asked
    assert {"gate_up_nf4", "down_nf4"} <= half._keep_in_fp32_modules_strict
    assert_same(want, nf4_state(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)))  # default: as saved


def test_from_pretrained_with_the_models_own_config_and_state_dict():
    """transformers reads config.quantization_config as a dict; a swapped model's config holds the Nf4MoeConfig."""
    model = swapped("Qwen3MoeConfig")
    sd = model.state_dict()
    again = type(model).from_pretrained(None, config=model.config, state_dict=sd)
    assert_same(sd, again.state_dict())


def test_partial_checkpoint_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = swapped("Qwen3MoeConfig")
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    victim = next(k for k in tensors if k.endswith("experts.down_nf4.absmax"))
    del tensors[victim]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'{victim}' is missing"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_experts_swapped_in_the_inner_model_round_trip_through_the_outer(tmp_path):
    """replace_experts(model.model): the quantizer sits on the inner model, but the config (shared) carries the
    table, the outer model's state_dict the NF4 tensors and markers."""
    torch.manual_seed(0)
    model = make_model("Qwen3MoeConfig", torch.bfloat16)
    nf4moe.replace_experts(model.model, lora_rank=2, backend="reference")
    randomize_lora(model)
    model.save_pretrained(tmp_path)
    restored = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same(model.state_dict(), restored.state_dict())


def test_a_module_swapped_by_hand_is_never_reloaded_as_random_experts(tmp_path):
    """QuantGroupedExperts put into a transformers model without replace_experts: no quantizer, no table; the
    markers in its state_dict make every reload fail instead of initialising dense experts."""
    model = make_model("Qwen3MoeConfig", torch.bfloat16)
    dense = model.model.layers[0].mlp.experts
    model.model.layers[0].mlp.experts = nf4moe.QuantGroupedExperts.from_weights(
        dense.gate_up_proj.detach(), dense.down_proj.detach(), lora_rank=2, backend="reference")
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither the nf4moe quantization_config nor"):
        nf4moe.from_pretrained(tmp_path)


_CHILD = r"""
import sys, torch, transformers
if sys.argv[2] == "with":
    import nf4moe
try:
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
except RuntimeError as e:
    print("REFUSED", str(e)[:200])
    sys.exit(3)
torch.save(model.state_dict(), sys.argv[1] + "/child_state.pt")
print("LOADED", type(model.hf_quantizer).__name__)
"""


def test_fresh_process_restores_with_nf4moe_and_refuses_without(tmp_path):
    model = swapped("Qwen3MoeConfig")
    model.save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = [sys.executable, "-c", _CHILD, str(tmp_path)]
    out = subprocess.run(run + ["with"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "LOADED Nf4MoeQuantizer" in out.stdout, out.stdout + out.stderr[-3000:]
    assert_same(model.state_dict(), torch.load(tmp_path / "child_state.pt"))
    out = subprocess.run(run + ["without"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 3 and "REFUSED" in out.stdout, (
        "a transformers without nf4moe loaded the checkpoint (random experts): " + out.stdout + out.stderr[-3000:])
    assert "nf4moe" in out.stderr and "size mismatch" in out.stderr.lower().replace("reinit due to ", ""), out.stderr[-3000:]


def test_merge_and_unload_gives_a_plain_model_that_saves_dense(tmp_path):
    model = swapped("Qwen3MoeConfig")
    x = ids()
    before = logits(model, x)
    merged = nf4moe.merge_and_unload(model, dtype=torch.float32)
    assert getattr(merged, "hf_quantizer", None) is None and not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as fh:
        assert "quantization_config" not in json.load(fh)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not quant_experts(dense)
    assert torch.allclose(logits(dense, x), before, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------- common checks
@pytest.mark.parametrize("family", TARGETS)
def test_init_weights_never_touches_nf4_or_lora(family):
    model = swapped(family)
    before = copy.deepcopy(nf4_state(model))
    model.init_weights()  # transformers' (re)initialisation of every module it knows
    assert_same(before, nf4_state(model))


@pytest.mark.parametrize("family", TARGETS)
def test_dtype_casts_keep_nf4_bytes(family):
    model = swapped(family)
    before = {k: v for k, v in nf4_state(model).items() if "_nf4." in k}
    x = ids()
    for cast in (lambda m: m.to(torch.float16), lambda m: m.float(), lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        cast(model)
        assert_same(before, {k: v for k, v in nf4_state(model).items() if "_nf4." in k})
        logits(model, x)  # runs, finite
    lora = [t for k, t in nf4_state(model).items() if ".lora_" in k]
    assert lora and all(t.dtype == torch.bfloat16 for t in lora)


@pytest.mark.parametrize("family", TARGETS)
def test_generate_after_reload_gives_the_same_tokens(family, tmp_path):
    model = swapped(family)
    prompt = ids(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, **kw)
    model.save_pretrained(tmp_path)
    got = reference_backend(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)).generate(prompt, **kw)
    assert torch.equal(want, got)


@pytest.mark.parametrize("family", TARGETS)
def test_gradient_checkpointing_gives_the_same_lora_grads(family):
    model = swapped(family)
    model.train()
    x = ids()

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert out and all(".lora_" in n for n in out) and all(torch.isfinite(g).all() for g in out.values())
        return out

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------------------------------------- Trainer
def _train(model, out_dir, *, resume=None):
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(7)
            self.rows = torch.randint(0, 96, (16, 9), generator=g)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, seed=3, data_seed=3,
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_trainer_save_steps_resume_bit_identical(tmp_path):
    straight = _train(swapped("Qwen3MoeConfig"), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file()
    # the checkpoint itself reloads through transformers: the NF4 bytes it saved are the model's
    nf4_saved = {k: v for k, v in nf4_state(transformers.AutoModelForCausalLM.from_pretrained(ckpt)).items()
                 if "_nf4." in k}
    assert_same(nf4_saved, {k: v for k, v in nf4_state(straight).items() if "_nf4." in k})
    # a new run from a different LoRA init, resumed at step 2, ends where the uninterrupted run ended
    resumed = _train(swapped("Qwen3MoeConfig", seed=5), tmp_path / "b", resume=str(ckpt))
    assert_same(nf4_state(straight), nf4_state(resumed))
