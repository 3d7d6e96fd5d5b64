"""The model: the Flax NNX decoder (Qwen2/2.5, Qwen3, Llama/SmolLM2; qwen.py), attention
(blockwise, cuDNN fused, O(T + S) masks), the KV cache, log-probs without [B, T, V] logits, the
decoder over groups sharing a prompt, weights in and out (HF safetensors, GGUF) and the tokenizer.
May import runtime/ (sharding constraints, the compilation cache's directory) and nothing else of
igpo_jax.
"""
