"""TRL's SFTTrainer on a model with nf4moe experts (issue 36, deliver 4), CPU, reference backend: most fine-tuning
scripts start from it.  A few steps train exactly the LoRA factors, and its checkpoint reloads bit-exactly through
transformers (the nf4moe quantizer)."""
from __future__ import annotations

import torch
import transformers
import trl  # a dev dependency (pyproject.toml)

import nf4moe
from nf4moe.adapters.replace import quant_experts

from test_adapters import VOCAB, make_model


def word_tokenizer():
    """A real transformers tokenizer over the tiny model's vocabulary, built offline (ids as words <i>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(VOCAB)}, unk_token="<1>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<0>", eos_token="<2>", unk_token="<1>")


def test_sft_trainer_trains_the_lora_and_its_checkpoint_reloads(tmp_path):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"input_ids": torch.randint(3, VOCAB, (12,), generator=g).tolist()} for _ in range(8)])
    model = nf4moe.replace_experts(make_model("Qwen3MoeConfig"), lora_rank=4, backend="reference")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, save_steps=3, per_device_train_batch_size=2,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert changed == lora, f"trained other than the experts' LoRA: {sorted(changed ^ lora)[:5]}"
    restored = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-3")
    assert [n for n, _ in quant_experts(restored)] == [n for n, _ in quant_experts(model)]
    sd, rsd = model.state_dict(), restored.state_dict()
    assert sd.keys() == rsd.keys() and all(torch.equal(sd[k], rsd[k]) for k in sd)
