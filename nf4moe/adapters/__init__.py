"""Model-facing code: replace_experts, the expert-class table, PEFT and bitsandbytes interop."""
