"""What a person watching or reading a run sees: live progress bars (progress.py), per-step
metrics to the console, metrics.jsonl, TensorBoard and W&B (metrics.py), metrics combined across
hosts (host_metrics.py), rollout sample records (samples.py) and the HTML report page (html.py,
pure rendering). May import data/, rollout/ and igpo/ (to describe episodes); never training/ or
the entry points. The learning-curve figure is an entry point of its own: igpo_jax/plot.py.
"""
