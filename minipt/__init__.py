"""minipt: prompt tuning written out in plain PyTorch."""
