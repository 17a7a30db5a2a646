"""VBench-2.0's standard prompt suite and official evaluator, where the optional `vbench2` package is installed.

The prompts are read from the installed package's `VBench2_full_info.json` (1,230 prompts over 18
dimensions), never copied into this repository. `import vbench2` pulls its heavy evaluator
dependencies (torchvision, decord, detectron2 ...), so the suite file is found without importing
the package and the evaluator runs in a subprocess, only where it imports.

VBench-2.0 matches videos by name: for each prompt of a dimension it looks in one flat folder for
`{prompt[:180]}-{i}.mp4`, i = 0..2 (0..19 for Diversity), and nothing but the videos may be in that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from gigavideo.errors import ConfigError

SUITE_FILE = "VBench2_full_info.json"
INSTALL_HINT = "pip install --no-deps 'vbench2==0.1.1' (or: pip install -e '.[vbench2]' --no-deps)"
_SPECIAL = {"multi_view_consistency": "Multi-View_Consistency"}


def vbench_name(dimension: str) -> str:
    """Our dimension name -> VBench-2.0's ("human_anatomy" -> "Human_Anatomy")."""
    return _SPECIAL.get(dimension, "_".join(w.capitalize() for w in dimension.split("_")))


def samples_per_prompt(dimension: str) -> int:
    """How many videos per prompt VBench-2.0's matcher looks for."""
    return 20 if dimension == "diversity" else 3


MAX_NAME_BYTES = 255  # a file name's limit on every common filesystem


def video_name(prompt: str, index: int) -> str:
    """VBench-2.0's file name: the prompt's first 180 characters, '-', the sample index. A prompt that cannot be
    a file name as it is ('/' or NUL in it, or over 255 bytes in UTF-8, as 180 CJK characters are) has those
    characters replaced by '_', is cut to fit in bytes, and gets a hash of the whole prompt, so that two such
    prompts never share a name."""
    stem, suffix = prompt[:180], f"-{index}.mp4"
    safe = stem.replace("/", "_").replace("\0", "_")
    if safe == stem and len((stem + suffix).encode()) <= MAX_NAME_BYTES:
        return stem + suffix
    tag = "~" + hashlib.sha256(prompt.encode()).hexdigest()[:10]
    budget = MAX_NAME_BYTES - len((tag + suffix).encode())
    return safe.encode()[:budget].decode(errors="ignore") + tag + suffix


def suite_file() -> Path:
    spec = importlib.util.find_spec("vbench2")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the VBench-2.0 prompt suite needs the vbench2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SUITE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the vbench2 package has no {SUITE_FILE}; reinstall it: {INSTALL_HINT}")
    return path


def suite_prompts(dimension: str, limit: int = 0) -> list[dict]:
    """The suite's prompts of one dimension, in the suite's order: {prompt, questions, expectations}.

    Auxiliary info becomes what our scorers use: a list of yes/no questions (Mechanics, Material ...),
    the camera motion ("zoom_in"), or the instance count ("2.orange dog").
    """
    entries = [e for e in json.loads(suite_file().read_text()) if vbench_name(dimension) in e["dimension"]]
    if not entries:
        raise ConfigError(f"dimension {dimension!r} ({vbench_name(dimension)}) has no prompts in {suite_file()}")
    items = []
    for entry in entries[: limit or None]:
        prompt, aux = entry["prompt_en"], entry.get("auxiliary_info")
        item = {"prompt": prompt, "questions": [f"Does the video show this: {prompt.rstrip('.')}?"]}
        if isinstance(aux, list) and aux:
            item["questions"] = [q.replace("(yes or no)", "").strip() for q in aux]
        elif isinstance(aux, str) and dimension == "camera_motion":
            item["expected_motion"] = aux
        elif isinstance(aux, str) and dimension == "instance_preservation" and "." in aux:
            count, name = aux.split(".", 1)
            item["expected_instances"] = f"{count} {name}"
        items.append(item)
    return items


def evaluator_available() -> str | None:
    """None when `vbench2` imports (its evaluator dependencies are installed), else why not."""
    probe = subprocess.run([sys.executable, "-c", "import vbench2"], capture_output=True, text=True)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def evaluate(videos_dir: Path, dimension: str, output_dir: Path, name: str) -> dict:
    """Run VBench-2.0's evaluator on one folder for one dimension; returns {score, results_file}.

    The `vbench2 evaluate` command of vbench2 0.1.1 imports the wrong package in its launcher, so
    this calls the same `VBench2.evaluate` API it would, in a child process (CUDA only, as upstream).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, torch; from vbench2 import VBench2; "
        "VBench2(torch.device('cuda'), sys.argv[1], sys.argv[2]).evaluate("
        "videos_path=sys.argv[3], name=sys.argv[4], dimension_list=[sys.argv[5]])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(suite_file()), str(output_dir), str(videos_dir), name, vbench_name(dimension)],
        capture_output=True,
        text=True,
    )
    results_file = output_dir / f"{name}_eval_results.json"
    if done.returncode != 0 or not results_file.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"VBench-2.0 evaluator failed on {videos_dir} ({vbench_name(dimension)}): {tail}")
    result = json.loads(results_file.read_text())[vbench_name(dimension)]
    score = result[0] if isinstance(result, (list, tuple)) else result
    return {"score": float(score), "results_file": str(results_file)}
