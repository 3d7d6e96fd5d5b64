"""Memory per device from shapes alone: the estimates (memory.py) and XLA's own figures for the
programs a config runs, compiled on simulated CPU devices (compiled.py); the command line is
igpo_jax/plan.py. compiled.py imports memory.py, never the other way round. May import model/,
runtime/ and, to compile them, the programs of rollout/, igpo/ and training/.
"""
