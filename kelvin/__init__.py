"""Kelvin orchestration: run configs, rollouts shared by training and evaluation, PPO training."""
