"""Trainers: SGPO (on-policy preference optimization with a self-improver) and improver SFT, each beside its config."""
