"""rlft_ray: distributed RL fine-tuning on Ray (rollout actors + Ray Train learners + Ray Tune)."""

__version__ = "0.1.0"
