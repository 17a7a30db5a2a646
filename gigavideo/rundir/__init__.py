"""The run directory, the contract between stages: its layout, the shard schema, shard writing and
reading, the completion protocol, atomic files, locks and the mp4 codec."""
