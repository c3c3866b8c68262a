"""PEFT's 'all-linear' on an MoE model also targets parameters named gate_up_proj/down_proj, which are
the keys of QuantGroupedExperts' own LoRA factors: the forward must say what happened, by name."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import nf4moe


def test_peft_wrapping_our_lora_factors_is_reported():
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                         num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    nf4moe.replace_experts(model, lora_rank=4, backend="reference")
    model(torch.randint(0, 64, (1, 5)))  # fine before PEFT touches it
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(TypeError, match="lora_A.*PEFT wrapped nf4moe's own LoRA parameters"):
        peft_model(torch.randint(0, 64, (1, 5)))
