"""The video models: loading and checking pipelines, the families, the base model by model.kind, attention
backends, the sampler, and export."""
