"""The weakness-targeted prompt engine (stage 1): dimension registry and the template engine.

A dimension is a small TOML file in `configs/dimensions/` (or any folder given by flag):
title, description, a prompt template, a verification-question template whose "yes" means the
video passes, seed examples ({subject, action}), and pools of subjects and actions for analogies.
The engine's steps live in `prompt_engine.py`; the offline template backend (`llm.py`) builds
its answers from a dimension's seeds and pools and the setting/camera/lighting lists here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gigavideo.config import PRESETS_DIR
from gigavideo.errors import ConfigError
from gigavideo.rundir.fields import is_name
from gigavideo.rundir.files import read_toml

DIMENSIONS_DIR = PRESETS_DIR / "dimensions"
SETTINGS = [
    "in a sunlit park",
    "in a small kitchen",
    "on a city street at night",
    "in an empty gym",
    "on a beach at sunset",
    "in a snowy field",
    "in a bright studio",
    "in a quiet library",
]
CAMERAS = ["wide shot", "medium shot", "close-up shot", "eye-level shot", "low-angle shot"]
LIGHTING = ["soft daylight", "warm evening light", "cool overcast light", "dramatic side light"]
STYLE_FILE = "style.toml"  # beside the dimension files: the template engine's phrases, not a dimension


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
    paper: dict = field(default_factory=dict)  # the paper's VBench-2.0 scores: {wan2_1, gigavideo_1}
    target: float = 1.0  # the reward this dimension should reach; diagnosis ranks weakness by the gap to it


def load_style(directory: str | Path = "") -> tuple[list[str], list[str], list[str]]:
    """The template engine's settings, camera and lighting phrases: `style.toml` of the dimensions folder if
    it has one (the toy world describes its plain clips), else the general lists above."""
    path = Path(directory or DIMENSIONS_DIR) / STYLE_FILE
    if not path.is_file():
        return SETTINGS, CAMERAS, LIGHTING
    raw = read_toml(path)
    return raw.get("settings", SETTINGS), raw.get("cameras", CAMERAS), raw.get("lighting", LIGHTING)


def load_dimension(name: str, directory: str | Path = DIMENSIONS_DIR) -> Dimension:
    if not is_name(name):
        raise ConfigError(f"dimension {str(name)[:120]!r}: not a dimension name (letters, digits, '_' and '-')")
    path = Path(directory) / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(directory).glob("*.toml"))
        raise FileNotFoundError(f"dimension {name!r}: no file {path}; known dimensions: {known}")
    raw = read_toml(path)
    try:
        dim = Dimension(name=name, **raw)
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not dim.excluded and (len(dim.seeds) < 1 or any({"subject", "action"} - set(s) for s in dim.seeds)):
        raise ConfigError(f"{path}: a dimension needs seeds, each with a subject and an action")
    return dim


def resolve_dimensions(names: list[str], directory: str | Path = "") -> list[Dimension]:
    """Load the named dimensions; ["all"] is every dimension file not marked excluded."""
    directory = Path(directory or DIMENSIONS_DIR)
    if list(names) == ["all"]:
        names = sorted(p.stem for p in directory.glob("*.toml") if p.name != STYLE_FILE)
        return [d for d in (load_dimension(n, directory) for n in names) if not d.excluded]
    dims = [load_dimension(n, directory) for n in names]
    excluded = [d.name for d in dims if d.excluded]
    if excluded:
        raise ConfigError(f"dimensions {excluded} are excluded from targeting (see their files)")
    return dims
