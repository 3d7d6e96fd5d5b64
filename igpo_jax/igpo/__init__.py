"""The IGPO algorithm: gold-answer scoring, rewards, turn advantages, policy loss."""
