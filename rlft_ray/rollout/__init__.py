"""Rollout workers: plain classes plus thin ``@ray.remote`` wrappers."""
