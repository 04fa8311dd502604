"""Plumbing every layer may use: errors, atomic file writes, torch/thread helpers."""
