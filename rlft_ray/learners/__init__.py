"""Algorithm-specific learners behind the one :class:`~rlft_ray.learners.base.Learner` interface."""
