#!/usr/bin/env python
"""The report across the rounds of `ROUNDS=N bash slurm/pipeline.sh`: every round's model against the base.

Round R's eval compares round R's model with its own base, round R-1's model, on the eval's prompts and
seeds; round 1's base is the original base model. So no video is rendered again here: per suite, dimension
and round the report gives
- the score of round R's model (mean judge reward);
- the difference from the previous round, with its interval (round R's own eval);
- the difference from the original base, with its interval, paired over the videos both evals made
  (round 1's baseline videos against round R's fine-tuned ones);
- the drift of the video statistics from the base's, and the realism distance to the real clips;
and per round and step the cost: the wall time of the step's processes summed over ranks (GPU-seconds
with one process per GPU), from each manifest. Writes RUN_DIR/rounds.json and RUN_DIR/rounds.md.
"""

from __future__ import annotations

import logging

from gigavideo.cli import run_cli, setup_logging
from gigavideo.config import load_config
from gigavideo.errors import ConfigError
from gigavideo.eval.rounds import build, markdown
from gigavideo.rundir.files import write_atomic, write_json_atomic
from gigavideo.rundir.layout import RunDir

log = logging.getLogger("gigavideo.rounds")


def main(run_dir: str = "runs/demo", config: str = "tiny", rounds: int = 2, **overrides):
    """Write RUN_DIR/rounds.json and rounds.md from the evals of RUN_DIR/round1 ... round{ROUNDS}
    (the bootstrap's resamples and seed: the preset's [eval], e.g. --bootstrap_samples=5000)."""
    setup_logging()
    if rounds < 1:
        raise ConfigError(f"--rounds={rounds}: at least one round")
    ev = load_config(config, "eval", overrides).eval
    report = build(run_dir, rounds, ev.bootstrap_samples, ev.seed)
    path, text = RunDir(run_dir).path, markdown(report)
    write_json_atomic(path / "rounds.json", report)
    write_atomic(path / "rounds.md", lambda tmp: tmp.write_text(text))
    log.info("rounds report: %s\n%s", path / "rounds.md", text)


if __name__ == "__main__":
    run_cli(main, "eval")
