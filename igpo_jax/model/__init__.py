"""Model layer: Flax NNX decoder (Qwen2/2.5, Qwen3, Llama/SmolLM2), weights, tokenizer."""
