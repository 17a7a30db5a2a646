"""Measuring: the report, paired statistics, figures, the gallery, the diagnosis and VBench-2.0."""
