"""posttrain: DeepSeek-style post-training (SFT, RLAIF, GRPO, distillation) from one recipe file."""

__version__ = "0.1.0"
