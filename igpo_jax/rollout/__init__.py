"""Questions → trajectories: the jitted, resumable sampler over a KV cache (sampler.py; its padded
sizes in buckets.py), multi-turn episodes with asynchronous search (episodes.py), tool-call
parsing (parse.py), the prompts (prompts.py) and the Trajectories pytree the rest of the step
reads (trajectories.py). May import model/, search/, data/ (the Example type) and runtime/; never
igpo/, training/ or the entry points.
"""
