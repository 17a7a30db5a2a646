"""Scoring a clip: the vision-language judge, how each judge class reads a clip, and the specialists."""
