"""The weakness-targeted prompt engine (stage 1): dimension registry and the template engine.

A dimension is a small TOML file in `configs/dimensions/` (or any folder given by flag):
title, description, a prompt template, a verification-question template whose "yes" means the
video passes, seed examples ({subject, action}), and pools of subjects and actions for analogies.
The engine follows the paper's steps: analogy from a seed -> augmentation into a full video
prompt -> a yes/no verification question.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .config import PRESETS_DIR

DIMENSIONS_DIR = PRESETS_DIR / "dimensions"
SETTINGS = ["in a sunlit park", "in a small kitchen", "on a city street at night", "in an empty gym",
            "on a beach at sunset", "in a snowy field", "in a bright studio", "in a quiet library"]
CAMERAS = ["wide shot", "medium shot", "close-up shot", "eye-level shot", "low-angle shot"]
LIGHTING = ["soft daylight", "warm evening light", "cool overcast light", "dramatic side light"]


@dataclass
class Dimension:
    name: str
    title: str
    description: str
    prompt: str
    question: str
    scorer: str
    seeds: list[dict]
    checks: str = ""  # what the verification question must check
    subjects: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    excluded: bool = False  # listed for completeness, never targeted (Diversity)


def load_dimension(name: str, directory: str | Path = DIMENSIONS_DIR) -> Dimension:
    path = Path(directory) / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(directory).glob("*.toml"))
        raise FileNotFoundError(f"dimension {name!r}: no file {path}; known dimensions: {known}")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    try:
        dim = Dimension(name=name, **raw)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from None
    if not dim.excluded and (len(dim.seeds) < 1 or any({"subject", "action"} - set(s) for s in dim.seeds)):
        raise ValueError(f"{path}: a dimension needs seeds, each with a subject and an action")
    return dim


def template_prompts(dim: Dimension, count: int, seed: int) -> list[dict]:
    """Deterministic prompts for one dimension: same (dimension, count, seed), same list."""
    rng = random.Random(f"{dim.name}:{seed}")
    subjects = [s["subject"] for s in dim.seeds] + dim.subjects
    actions = [s["action"] for s in dim.seeds] + dim.actions
    out, seen = [], set()
    attempts = 0
    while len(out) < count and attempts < count * 50:
        attempts += 1
        seed_index = rng.randrange(len(dim.seeds))
        example = dim.seeds[seed_index]
        # Analogy: keep one half of the seed, replace the other from the dimension's pools.
        if rng.random() < 0.5:
            subject, action = rng.choice(subjects), example["action"]
        else:
            subject, action = example["subject"], rng.choice(actions)
        core = dim.prompt.format(subject=subject, action=action)
        # Augmentation: setting, camera and lighting make it a full video prompt.
        setting, camera, light = rng.choice(SETTINGS), rng.choice(CAMERAS), rng.choice(LIGHTING)
        prompt = f"{setting[0].upper()}{setting[1:]}: {core}. {camera[0].upper()}{camera[1:]}, {light}."
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({
            "prompt": prompt,
            "question": dim.question.format(subject=subject, action=action),
            "lineage": {"seed_index": seed_index, "seed": example, "subject": subject, "action": action,
                        "steps": ["analogy", "augmentation", "question"]},
        })
    return out
