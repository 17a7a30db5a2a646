"""Stage 3's judges and specialist scorers."""

import hashlib

import numpy as np
import pytest
from chat_server import ChatServer
from conftest import run_stage
from PIL import Image

from gigavideo.judges import camera_motion, instances
from gigavideo.judges.camera_clips import camera_clip
from gigavideo.judges.judge import OpenAIJudge
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json
from gigavideo.toy.clips import make_clip


def test_the_tiny_vlm_scores_stage2_videos_through_the_real_code_path(scored_run):
    for record in index_json(RunDir(scored_run), "stage3").values():
        vlm = record["scores"]["vlm:0"]
        assert 0 < vlm["p_yes"] and 0 < vlm["p_no"] and vlm["p_yes"] + vlm["p_no"] <= 1
        assert vlm["reward"] == pytest.approx(vlm["p_yes"] / (vlm["p_yes"] + vlm["p_no"]))
        assert record["judge"].endswith("models/judge")


@pytest.mark.slow
def test_the_tiny_vlm_scores_the_same_without_batching(scored_run, scored_copy):
    first = index_json(RunDir(scored_run), "stage3")
    run_stage("stage3", scored_copy, "--overwrite", "--batch_size=1")  # no batching, no padding
    again = index_json(RunDir(scored_copy), "stage3")
    for key, record in first.items():
        assert again[key]["scores"]["vlm:0"]["p_yes"] == pytest.approx(record["scores"]["vlm:0"]["p_yes"], rel=1e-4)
        assert again[key]["reward"] == pytest.approx(record["reward"], rel=1e-4)


def test_camera_dimension_gets_the_optical_flow_score_as_its_reward(scored_run):
    for record in index_json(RunDir(scored_run), "stage3").values():
        if record["dimension"] == "camera_motion":
            cam = record["scores"]["camera_motion"]
            assert cam["measured"] in camera_motion.LABELS and cam["expected"] in camera_motion.LABELS
            assert record["reward"] == cam["score"]  # specialist_first
    summary = read_manifest(RunDir(scored_run), "stage3")
    assert summary["num_samples"] == 9
    histogram = RunDir(scored_run).stage("stage3") / "rewards-camera_motion.png"
    assert Image.open(histogram).info["Software"].startswith("Matplotlib")


@pytest.mark.slow
def test_openai_judge_uses_logprobs_or_the_answer_text_and_reports_unparseable_answers(scored_copy):
    args = ["--overwrite", "--judge=openai", "--judge_model=vlm", "--judge_backoff=0.01", "--judge_timeout=2"]
    server = ChatServer(failures=["garbage", 503])
    try:
        run_stage("stage3", scored_copy, *args, f"--judge_base_url={server.url}", "--judge_concurrency=1")
    finally:
        server.close()
    records = index_json(RunDir(scored_copy), "stage3")
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "neither yes nor no: 'Perhaps.'" in failed[0]["reason"]
    for record in records.values():
        if record["status"] == "ok":
            p_yes = int(hashlib.sha256((record["question"] + " Answer yes or no.").encode()).hexdigest(), 16)
            p_yes = p_yes % 1000 / 1000 * 0.9
            assert record["scores"]["vlm:0"]["p_yes"] == pytest.approx(p_yes)
            assert record["scores"]["vlm:0"]["p_no"] == pytest.approx(0.95 - p_yes)
    server = ChatServer(judge_logprobs=False)
    try:
        proc = run_stage("stage3", scored_copy, *args, f"--judge_base_url={server.url}")
    finally:
        server.close()
    assert proc.stderr.count("gave no logprobs for yes or no") == 1  # said once, not silently 0/1
    for record in index_json(RunDir(scored_copy), "stage3").values():
        assert record["status"] == "ok" and record["scores"]["vlm:0"]["p_yes"] in (0.0, 1.0)


def test_the_openai_judge_reuses_its_connections():
    server = ChatServer()
    try:
        judge = OpenAIJudge(server.url, "vlm", num_frames=2, concurrency=2, timeout=5)
        frames = make_clip(0, num_frames=4)[0]
        answers = judge.score_many([(frames, f"Is there a square? ({i})") for i in range(12)])
    finally:
        server.close()
    assert all(isinstance(a, dict) and a["answer"] in ("yes", "no") for a in answers)
    assert server.requests == 12 and server.connections <= 2
    assert server.video_frames == [2] * 12  # one mp4 video_url of the 2 sampled frames each


def test_the_openai_judge_sends_one_mp4_video_or_pngs_and_the_mp4_is_smaller():
    frames = make_clip(0, 256, 256, 33)[0]
    video, images = (OpenAIJudge("http://x/v1", "m", num_frames=16, form=form) for form in ("video", "images"))
    as_video, as_images = video.media(frames), images.media(frames)
    assert [p["type"] for p in as_video] == ["video_url"] and [p["type"] for p in as_images] == ["image_url"] * 16
    size = {name: sum(len(str(p)) for p in parts) for name, parts in (("video", as_video), ("images", as_images))}
    assert size["images"] > 2 * size["video"], size  # a flat toy clip; bench/judge.py measures rendered ones
    assert video.input == {"input": "video", "frames": 16, "format": "mp4"}


def test_optical_flow_classifies_synthetic_camera_motion_with_at_least_95_percent_accuracy():
    rng = np.random.default_rng(0)
    cases = [
        (kind, speed, zoom)
        for kind in camera_motion.LABELS
        for speed, zoom in ((0.6, 1.015), (1.5, 1.03), (2.5, 1.04), (4.0, 1.06))
    ] * 2
    correct = sum(
        camera_motion.classify(camera_motion.global_motion(camera_clip(k, rng, s, z))) == k for k, s, z in cases
    )
    assert correct / len(cases) >= 0.95, f"{correct}/{len(cases)}"


def test_optical_flow_holds_up_on_noisy_and_low_texture_clips():
    rng = np.random.default_rng(1)
    hard = {"noise": 0.2}, {"smoothing": 12, "contrast": 0.1, "flat": 0.6}  # noise; a faint scene under a flat sky
    cases = [(kind, hardness) for kind in camera_motion.LABELS for hardness in hard for _ in range(2)]
    correct = sum(
        camera_motion.classify(camera_motion.global_motion(camera_clip(k, rng, 1.5, 1.03, **h))) == k for k, h in cases
    )
    assert correct / len(cases) >= 0.95, f"{correct}/{len(cases)}"


def test_camera_motion_is_read_from_the_prompt():
    assert camera_motion.expected_motion("A castle, the camera moves: pan to the left. Wide shot") == "pan_left"
    assert camera_motion.expected_motion("the camera slowly zooms in on a flower") == "zoom_in"
    assert camera_motion.expected_motion("A red square moves left, static camera.") == "static"
    assert camera_motion.expected_motion("a dog runs") is None


def test_instance_counts_must_hold_in_every_frame():
    frames, _ = make_clip(0, num_frames=9)
    detector = instances.BlobDetector()
    assert instances.score(detector, frames, "one square")[0] == 1.0
    doubled = frames.copy()
    doubled[4:, 2:8, 2:8] = (220, 40, 40)  # a second object appears halfway
    value, evidence = instances.score(detector, doubled, "one square moves")
    assert evidence["counts"][:4] == [1] * 4 and evidence["counts"][4:] == [2] * 5 and value == pytest.approx(4 / 9)
    assert instances.expected_count("three red balloons rise") == (3, "balloon")
    with pytest.raises(FileNotFoundError, match="YOLO-World weights"):
        instances.load_detector("yolo_world", "/nonexistent.pt")


def test_the_tiny_judge_is_a_llava_onevision_that_reads_the_clip_as_one_video(scored_run, tmp_path):
    import json
    import shutil

    import torch

    from gigavideo.config import ConfigError
    from gigavideo.judges.judge import TransformersJudge

    folder = RunDir(scored_run).models / "judge"
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "LlavaOnevisionForConditionalGeneration"
    ]
    tokens = 4 * 2 * 2 + 1  # 4 frames of a 4x4 patch grid pooled 2x2, plus the newline token
    recorded = read_manifest(RunDir(scored_run), "stage3")["judge_input"]
    assert recorded == {"input": "video", "frames": 4, "resolution": [32, 32], "visual_tokens_per_question": tokens}

    judge = TransformersJudge(folder, num_frames=4)
    frames, _ = make_clip(0, 32, 32, 9)
    inputs = judge.reader.inputs([(frames, "does the video show a camera")])
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    assert (inputs["input_ids"] == judge.model.config.video_token_index).sum() == tokens
    short = {**inputs, "input_ids": inputs["input_ids"][:, 1:], "attention_mask": inputs["attention_mask"][:, 1:]}
    short["input_ids"][short["input_ids"] == judge.model.config.video_token_index] = 0  # fewer video tokens
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        with torch.no_grad():
            judge.model(**short)

    remote, other = tmp_path / "remote", tmp_path / "other"
    for target, change in ((remote, {"auto_map": {"AutoModel": "x.Y"}}), (other, {"model_type": "blip"})):
        shutil.copytree(folder, target)
        config = json.loads((target / "config.json").read_text()) | change
        (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="remote code"):
        TransformersJudge(remote)
    with pytest.raises(ConfigError, match="'blip' model; supported: LlavaOnevisionForConditionalGeneration"):
        TransformersJudge(other)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.5", "3"])
def test_qwen_vl_judges_score_stage2_videos_as_video_through_the_same_judge_path(version, scored_copy, tmp_path):
    import torch

    from gigavideo.judges.judge import TransformersJudge
    from gigavideo.tiny.judges import build_tiny_qwen_vl_judge

    folder = tmp_path / f"qwen{version}"
    folder.mkdir()
    build_tiny_qwen_vl_judge(folder, version)
    run_stage(
        "stage3", scored_copy, "--overwrite", "--judge=transformers", f"--judge_path={folder}", "--score.dtype=float32"
    )
    records = index_json(RunDir(scored_copy), "stage3")
    assert all(r["status"] == "ok" and 0 < r["scores"]["vlm:0"]["p_yes"] < 1 for r in records.values())
    recorded = read_manifest(RunDir(scored_copy), "stage3")["judge_input"]
    # the 64x64 clips at multiples of 28 (patch 14), or of 32 (patch 16) within Qwen3-VL's per-frame pixel cap
    side = 56 if version == "2.5" else 32
    tokens = 2 * (side // (14 if version == "2.5" else 16)) ** 2 // 4  # 2 temporal patches, merged 2x2
    assert recorded == {"input": "video", "frames": 4, "resolution": [side, side], "visual_tokens_per_question": tokens}

    judge = TransformersJudge(folder, num_frames=4)
    inputs = judge.reader.inputs([(make_clip(0, 64, 64, 9)[0], "does the video show a camera")])
    video = judge.model.config.video_token_id
    assert (inputs["input_ids"] == video).sum() == tokens and inputs["video_grid_thw"].prod() == 4 * tokens
    fewer = inputs["input_ids"].clone()
    fewer[0, (fewer[0] == video).nonzero()[0]] = 0  # one video token less than the features
    with pytest.raises(ValueError, match="do not match"), torch.no_grad():
        judge.model(**{**inputs, "input_ids": fewer, "mm_token_type_ids": (fewer == video).long() * 2})


@pytest.mark.parametrize("family", ["llava-onevision", "qwen2.5-vl", "qwen3-vl"])
def test_every_video_judge_also_reads_frames_as_images_and_its_model_takes_them(family, tmp_path):
    """score.judge_input = images: the old way, kept for servers without video and for bench/judge.py's comparison."""
    import torch

    from gigavideo.judges.judge import TransformersJudge
    from gigavideo.tiny.judges import build_tiny_judge, build_tiny_qwen_vl_judge

    if family == "llava-onevision":
        build_tiny_judge({"tiny_image_size": 32, "tiny_patch_size": 8, "tiny_seed": 0}, tmp_path)
    else:
        build_tiny_qwen_vl_judge(tmp_path, family.removeprefix("qwen").removesuffix("-vl"))
    video, images = (TransformersJudge(tmp_path, num_frames=4, form=form) for form in ("video", "images"))
    clips = [(make_clip(seed, 64, 64, 9)[0], f"is there a square? {seed}") for seed in (0, 1)]
    inputs = images.reader.inputs(clips)
    image_token = images.reader.token_id
    per_question = images.input["visual_tokens_per_question"]
    assert (inputs["input_ids"] == image_token).sum(dim=1).tolist() == [per_question] * 2
    video.reader.inputs(clips[:1])
    assert per_question >= 2 * video.input["visual_tokens_per_question"]  # not pooled (OneVision), not paired (Qwen)
    with torch.no_grad():
        images.model(**inputs, logits_to_keep=1)  # raises where image features and tokens disagree
    scores = images.score_many(clips)
    assert all(0 < s["p_yes"] < 1 for s in scores) and images.input["input"] == "images"


@pytest.mark.parametrize("family", ["llava-onevision", "qwen2.5-vl", "qwen3-vl"])
def test_the_judge_inputs_are_its_processors_own_on_a_stage2_clip(family, scored_run, tmp_path):
    """Token ids and pixel tensors, against the checkpoint's AutoProcessor called by hand on the frames the model
    card says (4 sampled uniformly, at the clip's own times: stage 2's fps)."""
    import torch
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from gigavideo.judges.judge import TransformersJudge, clip_fps
    from gigavideo.rundir.fields import decode_video
    from gigavideo.rundir.shards import iter_samples
    from gigavideo.tiny.judges import build_tiny_judge, build_tiny_qwen_vl_judge

    if family == "llava-onevision":
        build_tiny_judge({"tiny_image_size": 32, "tiny_patch_size": 8, "tiny_seed": 0}, tmp_path)
    else:
        build_tiny_qwen_vl_judge(tmp_path, family.removeprefix("qwen").removesuffix("-vl"))
    sample = next(iter_samples(RunDir(scored_run), "stage2", fields=("json", "mp4")))
    clip, question = decode_video(sample, "mp4"), "does the video show a camera"
    fps = clip_fps(RunDir(scored_run))
    ours = TransformersJudge(tmp_path, num_frames=4, clip_fps=fps).reader.inputs([(clip, question)])

    processor = AutoProcessor.from_pretrained(str(tmp_path))
    indices = [round(i * (len(clip) - 1) / 3) for i in range(4)]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    metadata = VideoMetadata(total_num_frames=len(clip), fps=fps, frames_indices=indices)
    extra = {} if family == "llava-onevision" else {"cap_pixels_per_frame": True}
    theirs = processor(
        text=[text],
        videos=[clip[indices]],
        video_metadata=[metadata],
        do_sample_frames=False,
        return_tensors="pt",
        **extra,
    )
    assert set(ours) == set(theirs) and "pixel_values_videos" in ours
    for key, value in theirs.items():
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(value)), key


@pytest.mark.slow
def test_a_judge_server_is_started_waited_for_pointed_at_and_stopped_around_stage3(scored_copy):
    """slurm/stage3.sh with JUDGE_SERVER (here the test server, standing in for `vllm serve`), without SLURM."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = f"{sys.executable} {REPO / 'tests' / 'chat_server.py'}"
    env = {**os.environ, "PRESET": "tiny", "RUN_DIR": str(scored_copy), "PYTHON": sys.executable}
    env |= {"JUDGE_SERVER": f"{server} --startup 3", "JUDGE_PORT": str(port)}
    args = ["bash", "slurm/stage3.sh", "--overwrite", "--score.judge=openai", "--score.judge_model=vlm"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"answering at http://127.0.0.1:{port}/v1 after" in proc.stdout and "judge server: stopped" in proc.stdout
    records = index_json(RunDir(scored_copy), "stage3")
    assert all(r["status"] == "ok" and r["judge"] == f"openai:vlm@http://127.0.0.1:{port}/v1" for r in records.values())
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server is gone

    env["JUDGE_SERVER"] = f"{server} --fail"
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "the judge server exited before answering" in proc.stderr
    assert "the model does not fit in memory" in proc.stderr  # the end of its log, shown
    assert read_manifest(RunDir(scored_copy), "stage3")["num_samples"] == 9  # the finished stage is untouched
