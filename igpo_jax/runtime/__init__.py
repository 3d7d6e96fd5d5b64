"""What a run stands on: logical-axis → mesh-axis rules (sharding.py, the only module that knows
mesh axis names), multi-host start-up (distributed.py), XLA flags (xla_flags.py), the persistent
compilation cache (compilation_cache.py) and glibc malloc settings (host_memory.py). May import
jax and the standard library, no other igpo_jax package; the one exception,
sharding.sequence_parallel_attention, reads model/attention_mask.py's MaskSpec inside the function.
"""
