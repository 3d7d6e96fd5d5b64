"""Questions in, before any model exists: the reference's parquet format (examples.py: the Example
type, row validation, the resumable batch iterator), the embedded synthetic world and its corpus
(world.py) and, optionally, a prepared TFDS dataset (tfds.py). May import numpy, pyarrow and the
standard library, no other igpo_jax package; world.py and tfds.py import examples.py, which
imports neither (components.load_examples sends each of a run's sources to its reader).
"""
