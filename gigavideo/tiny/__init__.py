"""Random-weight, CPU-sized models of the real classes, built from configs (tests and the tiny preset)."""
