"""Reward functions for GRPO and rejection sampling (imported as `posttrain.rewards`)."""
