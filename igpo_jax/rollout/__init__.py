"""Agent layer: prompts, tool-call parsing, multi-turn rollout."""
