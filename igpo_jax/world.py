"""An alias, so that `python -m igpo_jax.world --out=DIR` keeps working: the embedded synthetic
world lives in igpo_jax/data/world.py; this module only runs its command line."""

from igpo_jax.data.world import main

if __name__ == "__main__":
    main()
