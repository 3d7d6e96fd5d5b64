"""What a person watching or reading a run sees: live progress, rollout samples, the HTML report."""
