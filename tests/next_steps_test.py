"""The lines a finished training program ends with point at files and configs that exist."""

import os

from igpo_jax.config_base import base_config
from igpo_jax.reporting import next_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_next_steps_name_the_report_and_the_comparison_for_the_world_and_for_data_files():
    config = base_config()
    config.run_dir = "runs/x"
    config.data.synthetic_world = True
    text = next_steps.next_steps(config)
    assert "python -m igpo_jax.report runs/x" in text and "runs/x/report.html" in text
    assert f"python -m igpo_jax.sweep {next_steps.WORLD_SWEEP} --launch" in text
    config.data.synthetic_world = False
    assert f"python -m igpo_jax.sweep {next_steps.DATA_FILES_SWEEP} --launch" in next_steps.next_steps(config)
    for sweep in (next_steps.WORLD_SWEEP, next_steps.DATA_FILES_SWEEP):
        assert os.path.isfile(os.path.join(REPO, sweep)), sweep
