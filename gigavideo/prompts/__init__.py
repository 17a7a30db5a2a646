"""Stage 1's data engine: the dimension registry, the LLM client and the engine's steps."""
