"""Export a trained policy as an HF safetensors directory (servable by vLLM, SGLang, transformers).

    python -m igpo_jax.export --config=configs/demo.py --checkpoint=runs/demo/checkpoints [--step=4] --out=DIR
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from igpo_jax import components
from igpo_jax.training import checkpoint
from igpo_jax.model.weights import export_hf



def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (it names the base model the checkpoint was trained from)")
    policy, tokenizer = components.load_policy(_CONFIG.value)
    step = checkpoint.restore_params(_CHECKPOINT.value, policy, step=_STEP.value)
    export_hf(policy, _OUT.value, tokenizer=tokenizer, dtype=_DTYPE.value)
    print(f"exported step {step} to {_OUT.value}")


def _define_flags():
    """Flags exist only when this module runs as a program, so that importing it (tests, other
    entry points) defines none."""
    global _CONFIG, _CHECKPOINT, _STEP, _OUT, _DTYPE
    _CONFIG = config_flags.DEFINE_config_file("config", None, "the run's experiment config", lock_config=True)
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "the run's checkpoint directory", required=True)
    _STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
    _OUT = flags.DEFINE_string("out", None, "output directory", required=True)
    _DTYPE = flags.DEFINE_string("dtype", None, "tensor dtype in the files (default: the model's param dtype)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
