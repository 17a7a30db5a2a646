"""The run directory, the contract between stages.

layout.py      where everything lives (RunDir), and reading a stage's manifest
fields.py      the shard schema: each stage's fields, their encoding, and the checks on a sample
shards.py      writing shards (renamed when complete), reading and joining them by key, a resumed rank's repairs
completion.py  the completion protocol: rank parts, the last rank writes the manifest, the failure bound
files.py       atomic files and folders, free-space checks;  locks.py  one process per rank's work
video.py       the mp4 codec of the video fields
"""
