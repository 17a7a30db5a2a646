"""The eval: VBench-2.0's layout checked by VBench-2.0's own matcher, held-out prompts, the report, resume."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import REPO, SCRIPTS, run_stage

from gigavideo.config import load_config
from gigavideo.eval.report import dimension_summary
from gigavideo.prompts.dimensions import resolve_dimensions
from gigavideo.rundir.layout import RunDir

DIMS = {"human_anatomy", "mechanics", "camera_motion"}


@pytest.fixture
def vbench2_class(monkeypatch, tmp_path):
    """VBench-2.0's own VBench2 class from the installed package. Its `utils` module imports the
    evaluator's heavy dependencies (cv2, decord, torchvision ...), none of which the matcher uses, so
    only that module is replaced, by one with its json helpers."""
    spec = importlib.util.find_spec("vbench2")
    package_dir = list(spec.submodule_search_locations)[0]
    utils = types.ModuleType("vbench2.utils")
    utils.load_json = lambda path: json.loads(open(path).read())
    utils.save_json = lambda data, path, indent=4: open(path, "w").write(json.dumps(data, indent=indent))
    utils.get_prompt_from_filename = utils.init_submodules = None
    package = types.ModuleType("vbench2")
    package.__path__, package.__package__, package.__spec__ = [package_dir], "vbench2", spec
    monkeypatch.setitem(sys.modules, "vbench2", package)
    monkeypatch.setitem(sys.modules, "vbench2.utils", utils)
    source = open(os.path.join(package_dir, "__init__.py")).read()
    exec(compile(source, os.path.join(package_dir, "__init__.py"), "exec"), package.__dict__)
    return package.VBench2


def test_vbench2_folders_pass_vbench2s_own_name_matching(vbench2_class, tmp_path):
    """The paths the eval renders its vbench2 suite to (eval_videos), as files, found by VBench-2.0's own matcher:
    every video of the chosen prompt and nothing else. The eval writing them there: the slow report test."""
    from gigavideo.eval.protocol import eval_videos
    from gigavideo.eval.vbench2 import suite_file, vbench_name

    cfg = load_config("tiny", "eval", {"suites": ["vbench2"], "vbench2_prompts_per_dimension": 1})
    videos, _ = eval_videos(cfg, resolve_dimensions(sorted(DIMS), cfg.prompts.dimensions_dir), [])
    assert len({v["prompt"] for v in videos}) == 3  # one prompt per dimension
    for v in videos:
        (tmp_path / "videos" / v["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / v["path"]).write_bytes(b"")
    for name in DIMS:
        chosen = {v["prompt"] for v in videos if v["dimension"] == name}
        matcher = vbench2_class("cpu", str(suite_file()), str(tmp_path / "info"))
        folder = tmp_path / "videos" / "vbench2" / vbench_name(name)
        info = json.loads(open(matcher.build_full_info_json(str(folder), name, [vbench_name(name)])).read())
        found = {e["prompt_en"]: e["video_list"] for e in info if e["video_list"]}
        assert set(found) == chosen and [len(v) for v in found.values()] == [3]  # the prompt, with all its videos


@pytest.mark.slow
def test_report_compares_both_suites_per_dimension_with_drift_protocol_and_chart(trained_run):
    run = RunDir(trained_run)
    report = json.loads((run.eval / "report.json").read_text())
    assert set(report["suites"]) == {"heldout", "vbench2"}
    for suite, pairs in (("heldout", 2), ("vbench2", 3)):
        body = report["suites"][suite]
        assert set(body["dimensions"]) == DIMS and (run.eval / body["chart"]).is_file()
        for result in body["dimensions"].values():
            assert result["n"] == pairs and result["ci_low"] <= result["difference"] <= result["ci_high"]
            assert set(result["drift"]) == {"brightness", "contrast", "saturation", "motion"}
    for item in report["suites"]["heldout"]["prompts"]:
        for label in ("baseline", "finetuned"):
            assert (
                run.eval / "videos" / label / "heldout" / item["dimension"] / f"{item['prompt'][:180]}-0.mp4"
            ).is_file()
    protocol = report["protocol"]
    for key in (
        "samples_per_prompt",
        "video_seed",
        "guidance_scale",
        "flow_shift",
        "steps",
        "height",
        "width",
        "num_frames",
        "prompt_variant",
    ):
        assert key in protocol
    assert protocol["flow_shift"] == 3.0 and protocol["steps"] == 4 and protocol["num_frames"] == 9
    markdown = (run.eval / "report.md").read_text()
    assert "| human_anatomy | 2 |" in markdown and "85.87 -> 90.18" in markdown and "chart-vbench2.png" in markdown
    assert not list((run.eval / "videos").rglob("*.tmp")) and not list((run.eval / "partial").glob("*"))


class GalleryPairs(HTMLParser):
    """The pairs of gallery.html: per pair its section (suite-dimension), key, difference, video sources, text."""

    def __init__(self):
        super().__init__()
        self.pairs, self.section = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and "id" in attrs:
            self.section = attrs["id"]
        elif tag == "div" and attrs.get("class") == "pair":
            self.pairs.append({"section": self.section, "key": attrs["data-key"], "sources": [], "text": ""})
            self.pairs[-1]["difference"] = float(attrs["data-difference"])
        elif tag == "video":
            self.pairs[-1]["sources"].append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "details":
            self.section = None

    def handle_data(self, data):
        if self.pairs and self.section:
            self.pairs[-1]["text"] += data


@pytest.mark.slow
def test_the_gallery_plays_every_pair_side_by_side_gains_then_losses(trained_run):
    from gigavideo.eval.report import load_records

    run = RunDir(trained_run)
    records = load_records(run.eval / "records")
    parser = GalleryPairs()
    parser.feed((run.eval / "gallery.html").read_text())
    heldout = [p for p in parser.pairs if p["section"].startswith("heldout-")]
    expected = {key for (label, key), r in records.items() if label == "finetuned" and key.startswith("heldout/")}
    assert sorted(p["key"] for p in heldout) == sorted(expected)  # every pair once
    for pair in parser.pairs:
        base, tuned = (records[(label, pair["key"])] for label in ("baseline", "finetuned"))
        assert [s.split("/")[1] for s in pair["sources"]] == ["baseline", "finetuned"]
        assert all((run.eval / unquote(s)).is_file() for s in pair["sources"])
        assert f"baseline {base['reward']:.3f}" in pair["text"] and f"fine-tuned {tuned['reward']:.3f}" in pair["text"]
        assert pair["difference"] == pytest.approx(tuned["reward"] - base["reward"], abs=1e-6)
    for section in {p["section"] for p in parser.pairs}:
        differences = [p["difference"] for p in parser.pairs if p["section"] == section]
        gains, losses = [d for d in differences if d >= 0], [d for d in differences if d < 0]
        assert differences == gains + losses  # the gains first, then the losses
        assert gains == sorted(gains, reverse=True) and losses == sorted(losses)  # each the largest first


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here (apt-get install chromium)")
@pytest.mark.slow
def test_a_browser_plays_the_first_pair_of_the_gallery(trained_run, tmp_path):
    assert CHROMIUM, "CI must run the browser test: .ci/run installs Debian's chromium"
    page = (RunDir(trained_run).eval / "gallery.html").resolve()

    def first_pair_after(budget_ms: int) -> str:
        """The first pair's markup after the page ran for `budget_ms` of Chromium's virtual time."""
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path}",
                "--window-size=1200,1600",
                "--autoplay-policy=no-user-gesture-required",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        parser = GalleryPairs()
        parser.feed(dom)
        assert parser.pairs, dom[:2000]
        first = dom[dom.index('class="pair"') :]
        return first[: first.index("</figure>", first.index("</figure>") + 1)]  # the first pair's two videos

    # Decoding runs on real threads, which virtual time does not wait for: on a loaded machine the videos may
    # not be loaded within one budget. Wait on the state itself: dump again, longer each time, for up to 2 min.
    deadline, budget = time.monotonic() + 120, 20000
    while (first := first_pair_after(budget)).count('data-state="loaded"') < 2 and time.monotonic() < deadline:
        budget *= 2
    assert first.count('data-state="loaded"') == 2, first[:2000]


@pytest.mark.slow
def test_the_eval_chart_is_matplotlibs_and_draws_the_interval_of_each_difference(trained_run, tmp_path):
    from PIL import Image

    from gigavideo.eval.figures import bar_chart_png
    from gigavideo.eval.report import chart_series

    run = RunDir(trained_run)
    for chart in run.eval.glob("chart-*.png"):
        assert Image.open(chart).info["Software"].startswith("Matplotlib")
    result = {"baseline": 0.4, "finetuned": 0.6, "difference": 0.2, "ci_low": 0.1, "ci_high": 0.3}
    bars, intervals = chart_series("mechanics", result, {})
    assert intervals == {"fine-tuned (judge)": pytest.approx((50.0, 70.0))}
    with_interval = bar_chart_png({"mechanics": bars}, tmp_path / "with.png", "t", {"mechanics": intervals})
    without = bar_chart_png({"mechanics": bars}, tmp_path / "without.png", "t")
    drawn = np.asarray(Image.open(tmp_path / with_interval).convert("L"), dtype=int)
    assert (drawn != np.asarray(Image.open(tmp_path / without).convert("L"), dtype=int)).any()


def test_heldout_prompts_leave_out_near_duplicates_of_training_prompts():
    from gigavideo.eval.protocol import eval_videos

    cfg = load_config("tiny", "eval", {"dimensions": ["mechanics"], "prompts_per_dimension": 4})
    dims = resolve_dimensions(["mechanics"])
    untouched, _ = eval_videos(cfg, dims, [])
    first, second = untouched[0]["prompt"], untouched[1]["prompt"]
    # a reworded copy of the first and an exact copy of the second were "trained on"
    reworded = first.replace("In a", "Inside a").replace("shot", "view")
    videos, notes = eval_videos(cfg, dims, [reworded, second, "A red square moves left."])
    kept = [v["prompt"] for v in videos]
    assert first not in kept and second not in kept and len(kept) == 4
    assert "2 of 12 candidate prompts left out" in notes["heldout"][0]


def test_paired_difference_interval_and_drift_on_synthetic_scores():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=400)
    videos = [{"key": str(i)} for i in range(400)]
    records = {}
    for i, b in enumerate(base):
        stats = {"brightness": 0.5, "contrast": 0.1, "saturation": 0.4, "motion": 0.2}
        records[("baseline", str(i))] = {"reward": b, "stats": stats}
        records[("finetuned", str(i))] = {
            "reward": b + 0.1 + rng.normal(0, 0.05),
            "stats": stats | {"brightness": 0.55},
        }
    records[("finetuned", "7")] = {"reward": None, "reason": "answer: maybe", "stats": None}
    summary = dimension_summary(videos, records, 4000, 0)
    assert summary["n"] == 399 and summary["failed"] == {"baseline": 0, "finetuned": 1}
    assert summary["difference"] == pytest.approx(0.1, abs=0.01)
    half_width = 1.96 * 0.05 / np.sqrt(399)  # the normal-theory interval of a mean of N(0.1, 0.05^2)
    assert summary["ci_high"] - summary["ci_low"] == pytest.approx(2 * half_width, rel=0.15)
    assert summary["drift"]["brightness"]["relative_change"] == pytest.approx(0.1)
    assert summary["drift"]["motion"]["relative_change"] == pytest.approx(0, abs=1e-9)


@pytest.mark.slow
def test_eval_killed_midway_and_rerun_renders_and_scores_each_video_once(trained_copy):
    run = RunDir(trained_copy)
    shutil.rmtree(run.eval)
    cmd = [
        sys.executable,
        str(REPO / SCRIPTS["eval"]),
        f"--run_dir={trained_copy}",
        "--suites=[heldout]",
        "--prompts_per_dimension=3",
        "--samples_per_prompt=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = run.eval / "records" / "rank00000.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.is_file() and records.read_text().count("\n") >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not run.is_complete("eval")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "still to render or score" in done.stderr
    lines = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    counts = Counter((r["label"], r["key"]) for r in lines)
    assert len(counts) == 2 * 3 * 3 * 2 and set(counts.values()) == {1}
    assert len(list((run.eval / "videos").rglob("*.mp4"))) == 36
    report = json.loads((run.eval / "report.json").read_text())
    assert all(r["n"] == 6 for r in report["suites"]["heldout"]["dimensions"].values())


@pytest.mark.parametrize(
    "preset,suites,vbench2_prompts,shared",
    [("tiny", ["heldout", "vbench2"], 1, 0), ("tiny", ["vbench2"], 0, "all"), ("toy", ["heldout"], 0, "some")],
)
def test_the_diagnosis_renders_its_own_prompts_and_seeds_not_the_evals(preset, suites, vbench2_prompts, shared):
    """So that the dimensions it chooses are not chosen by the eval's own noise. Where a suite has no other prompts
    (VBench-2.0's when the eval takes them all), it shares them, says so, and still has its own seeds."""
    from gigavideo.eval.protocol import eval_videos

    overrides = {"suites": suites, "vbench2_prompts_per_dimension": vbench2_prompts, "prompts_per_dimension": 2}
    cfg = load_config(preset, "eval", overrides)
    dims = resolve_dimensions(
        ["object_shade"] if preset == "toy" else ["mechanics", "camera_motion"], cfg.prompts.dimensions_dir
    )
    evaluated, _ = eval_videos(cfg, dims, [])
    diagnosed, notes = eval_videos(cfg, dims, [], diagnosis=True)
    assert len(diagnosed) == len(evaluated)
    assert {v["seed"] for v in diagnosed}.isdisjoint({v["seed"] for v in evaluated})
    both = {v["prompt"] for v in diagnosed} & {v["prompt"] for v in evaluated}
    declared = {v["prompt"] for v in diagnosed if v.get("shared_with_eval")}  # the eval's candidates, said so
    assert both <= declared
    if shared == "all":
        assert both == {v["prompt"] for v in evaluated} and all(" 0 of " not in n for n in notes["vbench2"])
    elif shared == 0:
        assert not declared and all(" 0 of " in note for suite in notes.values() for note in suite)


def test_video_names_are_vbench2s_where_they_can_be_file_names_and_bounded_unique_names_otherwise():
    from gigavideo.eval.vbench2 import video_name

    assert video_name("a cat jumps", 2) == "a cat jumps-2.mp4"  # VBench-2.0's own name
    long = "猫" * 100  # 300 bytes in UTF-8
    names = [video_name(long + "跳", 0), video_name(long + "跑", 0), video_name("a/../b", 1), video_name("a_.._b", 1)]
    assert len(set(names)) == 4  # cut or replaced names never collide
    for name in names:
        assert "/" not in name and len(name.encode()) <= 255 and name.endswith(".mp4")


@pytest.mark.slow
def test_the_eval_completes_with_300_byte_cjk_prompts_and_prompts_with_slashes_and_dots(trained_copy, tmp_path):
    dims = tmp_path / "dimensions"
    dims.mkdir()
    subjects = ["一只在雪地里奔跑的红色狐狸" * 8, "an owl/../a hawk", "../../etc"]  # the first: 312 bytes
    seeds = ", ".join(f'{{ subject = "{s}", action = "jumps" }}' for s in subjects)
    (dims / "cjk.toml").write_text(
        'title = "CJK"\nprompt = "{subject} {action}"\ndescription = "d"\nquestion = "Does {subject} {action}?"\n'
        f'scorer = "vlm"\nseeds = [{seeds}]\nsubjects = {json.dumps(subjects, ensure_ascii=False)}\n'
        'actions = ["jumps", "runs"]\n',
        encoding="utf-8",
    )
    shutil.rmtree(trained_copy / "eval")
    flags = [f"--prompts.dimensions_dir={dims}", "--dimensions=[cjk]", "--suites=[heldout]"]
    run_stage("eval", trained_copy, *flags, "--prompts_per_dimension=3", "--samples_per_prompt=1")
    report = json.loads((trained_copy / "eval" / "report.json").read_text())
    prompts = [item["prompt"] for item in report["suites"]["heldout"]["prompts"]]
    assert any(len(p.encode()) > 255 for p in prompts) and any("/../" in p for p in prompts), prompts
    videos = list((trained_copy / "eval" / "videos").rglob("*.mp4"))
    assert len(videos) == 2 * len(prompts) and all(v.resolve().is_relative_to(trained_copy / "eval") for v in videos)
