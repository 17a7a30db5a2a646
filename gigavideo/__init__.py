"""GigaVideo-1: weakness-targeted data, automatic feedback and reward-weighted fine-tuning of Wan2.1.

The stages talk only through shards in a run directory; `gigavideo.rundir` owns that contract.
"""
