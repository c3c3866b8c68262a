"""load_adapter refuses an adapter whose adapter_config.json and tensors disagree, naming what disagrees;
strict=False loads what fits.

Adapters are written by nf4moe.save_adapter and then edited as a truncated or hand-made adapter
would be (the manifest removed, as in an adapter PEFT wrote).  Packaged tiny Qwen3-MoE config
(2 layers, H = I = 128, E = 8), bf16, LoRA r=2, reference backend.
"""
from __future__ import annotations

import copy
import json
import os
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file, save_file

import nf4moe
from nf4moe.adapters.atomic import MANIFEST_NAME
from nf4moe.adapters.peft_io import _peft_nesting
from nf4moe.adapters.replace import quant_experts
from nf4moe.finetune import load_config, random_model

L0, L1 = "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"
PREFIX = "base_model.model."


@lru_cache(maxsize=None)
def tiny(seed: int):
    model = nf4moe.replace_experts(random_model(load_config(), seed=seed, dtype=torch.bfloat16), lora_rank=2,
                                   backend="reference")
    with torch.no_grad():
        for _, qe in quant_experts(model):
            for p in list(qe.lora_A.values()) + list(qe.lora_B.values()):
                p.normal_(0, 0.05)
    return model


def fresh():
    return copy.deepcopy(tiny(1))


def lora(model, module: str, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
    qe = model.get_submodule(module)
    return qe.lora_A[proj], qe.lora_B[proj]


def pair_keys(module: str, proj: str) -> tuple[str, str]:
    depth = _peft_nesting(("gate_up_proj", "down_proj"), ("gate_up_proj", "down_proj"), False)[proj]
    return tuple(f"{PREFIX}{module}.{depth}lora_{ab}.weight" for ab in "AB")


@pytest.fixture
def adapter(tmp_path):
    nf4moe.save_adapter(tiny(0), tmp_path)
    os.remove(tmp_path / MANIFEST_NAME)  # edited below, as a hand-made adapter: no manifest to contradict
    return tmp_path


def edit(directory, *, drop=(), tensors=None, config=None) -> None:
    """Rewrite an adapter: drop tensor keys, change tensors (key -> tensor), change config fields."""
    path = os.path.join(directory, "adapter_model.safetensors")
    sd = {k: v for k, v in load_file(path).items() if k not in drop}
    sd.update(tensors or {})
    save_file(sd, path)
    cpath = os.path.join(directory, "adapter_config.json")
    with open(cpath) as fh:
        cfg = json.load(fh)
    cfg.update(config or {})
    with open(cpath, "w") as fh:
        json.dump(cfg, fh)


def test_complete_adapter_loads_strictly_and_exactly(adapter):
    model = fresh()
    assert nf4moe.load_adapter(model, adapter) == "current"
    for module in (L0, L1):
        for proj in ("gate_up_proj", "down_proj"):
            for got, want in zip(lora(model, module, proj), lora(tiny(0), module, proj)):
                assert torch.equal(got, want), (module, proj)


def test_suffix_targets_as_peft_writes_them_load_strictly(adapter):
    edit(adapter, config={"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]})
    nf4moe.load_adapter(fresh(), adapter)
    edit(adapter, drop=pair_keys(L1, "gate_up_proj") + pair_keys(L1, "down_proj"))
    with pytest.raises(ValueError, match=rf"'{L1}': \['gate_up_proj', 'down_proj'\] targeted, no tensors"):
        nf4moe.load_adapter(fresh(), adapter)


def test_targeted_module_without_tensors_is_refused_unless_not_strict(adapter):
    edit(adapter, drop=pair_keys(L1, "gate_up_proj") + pair_keys(L1, "down_proj"))
    with pytest.raises(ValueError, match=rf"adapter_config.json and adapter_model.safetensors disagree: '{L1}': "
                                         r"\['gate_up_proj', 'down_proj'\] targeted, no tensors in the file \(missing\)"
                                         r".*strict=False"):
        nf4moe.load_adapter(fresh(), adapter)
    model = fresh()
    nf4moe.load_adapter(model, adapter, strict=False)
    assert torch.equal(lora(model, L0, "down_proj")[1], lora(tiny(0), L0, "down_proj")[1])
    assert not lora(model, L1, "gate_up_proj")[1].any() and not lora(model, L1, "down_proj")[1].any()


def test_targeted_projection_without_tensors_is_refused_unless_not_strict(adapter):
    edit(adapter, drop=pair_keys(L0, "down_proj"))
    with pytest.raises(ValueError, match=rf"'{L0}': \['gate_up_proj', 'down_proj'\] targeted, 1 LoRA pair\(s\) in "
                                         r"the file: .*\(missing\)"):
        nf4moe.load_adapter(fresh(), adapter)
    model = fresh()
    nf4moe.load_adapter(model, adapter, strict=False)
    assert torch.equal(lora(model, L0, "gate_up_proj")[0], lora(tiny(0), L0, "gate_up_proj")[0])
    assert not lora(model, L0, "down_proj")[1].any()


def test_tensors_for_an_untargeted_module_are_refused_unless_not_strict(adapter):
    edit(adapter, config={"target_parameters": [f"{L0}.gate_up_proj", f"{L0}.down_proj"]})
    with pytest.raises(ValueError, match=rf"'{L1}': tensors \[.*\] in the file, none of its parameters targeted "
                                         r"\(extra\)"):
        nf4moe.load_adapter(fresh(), adapter)
    nf4moe.load_adapter(fresh(), adapter, strict=False)


def test_target_matching_no_expert_parameter_is_refused(adapter):
    with open(adapter / "adapter_config.json") as fh:
        targets = json.load(fh)["target_parameters"]
    edit(adapter, config={"target_parameters": targets + ["model.layers.7.mlp.experts.gate_up_proj"]})
    with pytest.raises(ValueError, match=r"target_parameters entry 'model.layers.7.mlp.experts.gate_up_proj' matches "
                                         r"no parameter"):
        nf4moe.load_adapter(fresh(), adapter)
    nf4moe.load_adapter(fresh(), adapter, strict=False)


@pytest.mark.parametrize("strict", [True, False])
def test_rank_in_config_disagreeing_with_tensor_shapes_names_module_and_shapes(adapter, strict):
    edit(adapter, config={"r": 4})
    with pytest.raises(ValueError, match=rf"tensor shapes fit no layout for r=4 \(adapter_config.json\): '{L0}': "
                                         r"\{.*\(16, 128\), \(256, 16\).*expected \(current layout\) "
                                         r"\{'gate_up_proj': \(\(32, 128\), \(256, 32\)\)"):
        nf4moe.load_adapter(fresh(), adapter, strict=strict)


def test_one_wrongly_shaped_tensor_names_its_module(adapter):
    a_key, _ = pair_keys(L1, "down_proj")
    edit(adapter, tensors={a_key: torch.zeros(16, 64, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=rf"fit no layout for r=2 .*: '{L1}': .*\(16, 64\)") as err:
        nf4moe.load_adapter(fresh(), adapter)
    assert f"'{L0}'" not in str(err.value)  # the module that fits is not blamed
