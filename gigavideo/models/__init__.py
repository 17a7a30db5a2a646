"""The video models: loading and checking pipelines, the families, attention backends, the sampler,
export, and the memory planner."""
