#!/usr/bin/env python
"""One round of `ROUNDS=N bash slurm/pipeline.sh`: RUN_DIR/round{R}/ is a run directory of its own, with a
preset file, RUN_DIR/round{R}/preset.toml, that extends the pipeline's preset and names the round's base:
round 1 starts from the base model (prepared here, as scripts/prepare_base.py does), round R > 1 from round
R-1's export, which every round writes as a complete diffusers folder (train.merge_lora = true). Each round
draws new prompts, videos and training noise (the preset's stage-1, stage-2 and training seeds + R - 1); the
eval keeps its prompts and seeds, so that every round is measured on the same videos' seeds. Every round's
train.anchor_path and render.base_path are round 1's base (unless the preset sets them): with train.anchor_weight
> 0 the reference-model anchor holds each round near the original model, and with render.base_share > 0 that
share of each round's prompts is rendered by the original model. With train.realism_weight_by_round (or
anchor_weight_by_round), round R's realism_weight (anchor_weight) is its item R (the last one for later rounds).

Prints the steps the round still needs, one line: "complete" when its eval has finished, else
"diagnosis stage1 stage2 stage3 stage4 eval" (diagnosis only where the preset targets dimensions=auto).
Any one stage of a round reruns by hand like any run:
    PRESET=RUN_DIR/round2/preset.toml RUN_DIR=RUN_DIR/round2 bash slurm/stage4.sh
"""

from __future__ import annotations

import json
import logging

from gigavideo.cli import run_cli, setup_logging
from gigavideo.config import load_config, resolve_preset
from gigavideo.errors import ConfigError
from gigavideo.eval.diagnosis import pipeline_steps
from gigavideo.models.base import base_model_path, prepare_base
from gigavideo.rundir.files import write_atomic
from gigavideo.rundir.layout import RunDir

log = logging.getLogger("gigavideo.rounds")


def main(run_dir: str = "runs/demo", config: str = "tiny", round: int = 1):
    """Write RUN_DIR/round{ROUND}/preset.toml and print the steps the round still needs."""
    setup_logging()
    if round < 1:
        raise ConfigError(f"--round={round}: rounds count from 1")
    cfg, this = load_config(config, "model"), RunDir(run_dir).round(round)
    preset = this.path / "preset.toml"
    find_or_prepare = prepare_base if round == 1 else base_model_path  # a later round only finds round 1's base
    original = find_or_prepare(cfg, RunDir(run_dir)).resolve()
    base = original if round == 1 else RunDir(run_dir).round(round - 1).export.resolve()  # once R-1's stage 4 ran
    anchor = cfg.train.anchor_path or str(original)  # --anchor_weight > 0 keeps every round near the original
    by_round = [  # train.X_by_round: round R's X is item R (the last item for later rounds)
        f"{name} = {schedule[min(round, len(schedule)) - 1]}  # {name}_by_round"
        for name in ("realism_weight", "anchor_weight")
        if (schedule := cfg.train[f"{name}_by_round"])
    ]
    text = "\n".join(
        [
            f"# Round {round} of slurm/pipeline.sh (scripts/prepare_round.py): the preset below, starting from",
            "# round 1's base model" if round == 1 else f"# round {round - 1}'s model (its export, LoRA merged)",
            f"extends = {json.dumps(str(resolve_preset(config).resolve()))}",
            "",
            "[model]",
            f"path = {json.dumps(str(base))}",
            "",
            "[prompts]",
            f"seed = {cfg.prompts.seed + round - 1}",
            "",
            "[render]",
            f"seed = {cfg.render.seed + round - 1}",
            f"base_path = {json.dumps(cfg.render.base_path or str(original))}  # with base_share > 0",
            "",
            "[train]",
            "merge_lora = true  # the next round starts from a complete diffusers folder",
            f"anchor_path = {json.dumps(anchor)}",
            *by_round,
            f"seed = {cfg.train.seed + round - 1}",
            "",
        ]
    )
    if not preset.is_file() or preset.read_text() != text:
        write_atomic(preset, lambda tmp: tmp.write_text(text))
    if this.is_complete("eval"):
        print("complete")
        return
    print(" ".join(pipeline_steps(cfg)))


if __name__ == "__main__":
    run_cli(main, "model")
