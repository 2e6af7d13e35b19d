"""Retraining loop (placeholder): exports from labeled topics to ProGuard RL data; see README.md."""
