"""The IGPO algorithm: per-turn gold-answer log-probs (scoring.py), rewards (F1, format and
information gain; rewards.py), turn advantages (advantages.py), the clipped policy loss with KL
(loss.py), trajectories → advantages (pipeline.py), per-step diagnostics (diagnostics.py) and the
evaluation table (evaluation.py). rewards, advantages and loss are pure math: no config objects,
no I/O. May import model/ (scoring's forward pass), rollout/ (Trajectories, answer parsing),
data/ (the answer separator) and runtime/; never training/ or the entry points.
"""
