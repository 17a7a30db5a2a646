"""Stage 1's data engine: backends, filters, real captions, resume, distribution."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from chat_server import ChatServer
from conftest import REPO, run_stage

from gigavideo.prompts.engine import Similarity, parse_answer
from gigavideo.prompts.llm import OpenAIBackend, Request
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json
from gigavideo.rundir.video import encode_mp4
from gigavideo.tiny.chat import build_tiny_chat_model
from gigavideo.toy.clips import make_clip

FAST = ["--real_captions=", "--dimensions=mechanics,camera_motion"]


def synthetic(run_dir):
    return {k: v for k, v in index_json(RunDir(run_dir), "stage1").items() if v["source"] == "synthetic"}


@pytest.mark.slow
def test_template_engine_makes_the_requested_number_of_unique_prompts(tmp_path):
    proc = run_stage("stage1", tmp_path, *FAST, "--num_per_dimension=200")
    prompts = synthetic(tmp_path)
    assert len(prompts) == 400 and len({p["prompt"] for p in prompts.values()}) == 400
    assert all(p["question"].endswith("?") and p["lineage"]["seed"] for p in prompts.values())
    assert {p["dimension"] for p in prompts.values()} == {"mechanics", "camera_motion"}
    summary = read_manifest(RunDir(tmp_path), "stage1")["summary"]
    assert summary["mechanics"]["kept"] == 200 and "near_duplicate" in summary["camera_motion"]["dropped"]
    assert "camera_motion" in proc.stdout and "kept" in proc.stdout  # the summary table is printed


def test_answers_that_are_not_the_asked_json_are_rejected_with_a_reason():
    assert parse_answer("augment", '```json\n{"prompt": "  A  fox\\n runs. "}\n```') == "A fox runs."
    for raw, reason in (
        (None, "backend_error"),
        ("no json here", "malformed"),
        ("{broken", "malformed"),
        ('{"prompt": 3}', "malformed"),
        ('{"prompt": "   "}', "empty"),
        ("[1, 2]", "malformed"),
    ):
        with pytest.raises(ValueError, match=reason):
            parse_answer("augment", raw)
    with pytest.raises(ValueError, match="not_a_question"):
        parse_answer("question", '{"question": "Show a fox."}')
    items = parse_answer("analogy", '{"prompts": [{"subject": "a fox", "action": "runs"}, {"subject": 1}, "x"]}', 5)
    assert items == [{"subject": "a fox", "action": "runs", "seed_index": None}]


def test_embedding_dedup_catches_paraphrases_that_the_lexical_filter_misses():
    pairs = [
        (
            "A small dog runs quickly across a green lawn in the park.",
            "A little puppy sprints fast over the grass of a park.",
        ),
        (
            "An old man slowly climbs a long wooden staircase.",
            "An elderly gentleman makes his way up a tall flight of timber stairs.",
        ),
    ]
    unrelated = "A glass marble rolls down a metal ramp."
    embedding, lexical = Similarity(), Similarity(embedder_path="")
    lexical.model, lexical.kind = None, "lexical"
    assert embedding.kind.startswith("embedding")
    for a, b in pairs:
        va, vb, vu = embedding.embed([a, b, unrelated])
        assert embedding.matrix([va], [vb])[0, 0] > 0.6 > embedding.matrix([va], [vu])[0, 0]
        la, lb = lexical.embed([a, b])
        assert lexical.matrix([la], [lb])[0, 0] < 0.1  # no shared word 3-gram: the lexical filter keeps both
    kept_embed = _select([p for pair in pairs for p in pair], embedding, threshold=0.6)
    kept_lexical = _select([p for pair in pairs for p in pair], lexical, threshold=0.7)
    assert len(kept_embed) == 2 and len(kept_lexical) == 4


def _select(prompts, similarity, threshold):
    from collections import Counter

    from gigavideo.prompts.engine import select

    candidates = [{"prompt": p} for p in prompts]
    limits = {"min_words": 1, "max_words": 100, "dedup_threshold": threshold, "heldout_threshold": 2}
    return select(candidates, 100, similarity, limits, [], Counter())


@pytest.mark.slow
def test_prompts_close_to_the_heldout_set_are_removed(tmp_path):
    run_stage("stage1", tmp_path / "a", *FAST, "--num_per_dimension=10")
    chosen = sorted(p["prompt"] for p in synthetic(tmp_path / "a").values())[:3]
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(chosen) + "\n")
    run_stage("stage1", tmp_path / "b", *FAST, "--num_per_dimension=10", f"--heldout_file={heldout}")
    kept = {p["prompt"] for p in synthetic(tmp_path / "b").values()}
    assert not kept & set(chosen) and len(kept) == 20
    summary = read_manifest(RunDir(tmp_path / "b"), "stage1")["summary"]
    assert sum(s["dropped"].get("near_heldout", 0) for s in summary.values()) >= 3


@pytest.mark.slow
def test_real_captions_keep_their_video_and_bad_ones_are_dropped_and_counted(tmp_path):
    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(3):
        frames, caption = make_clip(i)
        (tmp_path / "clips" / f"{i}.mp4").write_bytes(encode_mp4(frames, 8))
        rows.append({"caption": caption, "video": f"clips/{i}.mp4"})
    (tmp_path / "clips" / "bad.mp4").write_bytes(b"not a video")
    rows += [{"caption": "a broken clip", "video": "clips/bad.mp4"}, {"caption": "gone", "video": "clips/none.mp4"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_stage(
        "stage1",
        tmp_path / "run",
        "--dimensions=mechanics",
        "--num_per_dimension=4",
        f"--real_captions={pairs}",
        "--real_per_synthetic=0.5",
    )
    from gigavideo.rundir.shards import iter_samples

    real = [s for s in iter_samples(RunDir(tmp_path / "run"), "stage1") if s["json"]["source"] == "real"]
    assert len(real) == 2  # 0.5 x 4 synthetic
    assert real[0]["real.mp4"] == (tmp_path / "clips" / "0.mp4").read_bytes()
    failures = read_manifest(RunDir(tmp_path / "run"), "stage1")["failures"]
    assert failures == []  # the quota of 2 was met before the bad rows were read
    run_stage("stage1", tmp_path / "all", "--dimensions=mechanics", "--num_per_dimension=4", f"--real_captions={pairs}")
    manifest = read_manifest(RunDir(tmp_path / "all"), "stage1")
    assert manifest["summary"]["real"]["kept"] == 3
    assert sorted(f["key"] for f in manifest["failures"]) == ["real-000003", "real-000004"]
    assert "bad.mp4: cannot decode" in manifest["failures"][0]["reason"]


def test_transformers_backend_with_garbage_output_drops_and_counts_everything(tmp_path):
    model, tokenizer = build_tiny_chat_model(["a", "the", "fox", "{", "}", ":", '"', "prompts"])
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    proc = run_stage(
        "stage1",
        tmp_path / "run",
        "--real_captions=",
        "--dimensions=mechanics",
        "--num_per_dimension=3",
        "--engine=transformers",
        f"--llm_path={tmp_path / 'lm'}",
        "--llm_max_new_tokens=24",
        "--llm_dtype=float32",
    )
    summary = read_manifest(RunDir(tmp_path / "run"), "stage1")["summary"]
    assert summary["mechanics"]["kept"] == 0 and summary["mechanics"]["candidates"] == 0
    units = 2  # ceil(3 x 2.0 / 4)
    assert summary["mechanics"]["dropped"] == {"analogy_malformed": units}
    assert "analogy_malformed" in proc.stdout


@pytest.mark.slow
def test_openai_backend_retries_429_500_and_timeouts_and_gets_the_expected_prompts(tmp_path):
    args = [
        *FAST,
        "--num_per_dimension=4",
        "--engine=openai",
        "--llm_model=test-model",
        "--llm_timeout=1",
        "--llm_backoff=0.05",
        "--llm_concurrency=2",
    ]
    clean = ChatServer()
    try:
        run_stage("stage1", tmp_path / "clean", *args, f"--llm_base_url={clean.url}")
    finally:
        clean.close()
    flaky = ChatServer(failures=[429, 500, "timeout", 429, 500])  # 5 failures in a row; 5 retries allowed
    try:
        run_stage(
            "stage1",
            tmp_path / "flaky",
            *args,
            f"--llm_base_url={flaky.url}",
            env={"OPENAI_API_KEY": "sk-secret-test-key"},
        )
    finally:
        flaky.close()
    expected, got = synthetic(tmp_path / "clean"), synthetic(tmp_path / "flaky")
    assert len(expected) == 8 and got == expected
    assert flaky.requests > clean.requests  # the failures were really served and retried
    assert all("variant" in p["prompt"] for p in got.values())


def test_malformed_answers_are_asked_again_then_dropped_and_counted(tmp_path):
    server = ChatServer(failures=["garbage"] * 3 + ["garbage"])  # the first item 3 times, then one more once
    try:
        run_stage(
            "stage1",
            tmp_path,
            *FAST,
            "--num_per_dimension=4",
            "--engine=openai",
            "--llm_model=m",
            f"--llm_base_url={server.url}",
            "--llm_concurrency=1",
            "--max_retries=2",
        )
    finally:
        server.close()
    summary = read_manifest(RunDir(tmp_path), "stage1")["summary"]
    assert summary["camera_motion"]["dropped"].get("analogy_malformed") == 1  # unit 0 gave garbage 3 times
    assert summary["camera_motion"]["candidates"] == 4  # unit 1 gave garbage once, then a good answer


def test_the_api_key_comes_from_the_environment_and_is_never_logged(tmp_path):
    seen = []
    server = ChatServer()
    original = server.httpd.RequestHandlerClass.do_POST

    def spy(handler):
        seen.append(handler.headers.get("Authorization"))
        original(handler)

    server.httpd.RequestHandlerClass.do_POST = spy
    try:
        proc = run_stage(
            "stage1",
            tmp_path,
            *FAST,
            "--num_per_dimension=1",
            "--engine=openai",
            "--llm_model=m",
            f"--llm_base_url={server.url}",
            "--llm_api_key_env=MY_KEY",
            env={"MY_KEY": "sk-do-not-print", "GIGAVIDEO_LOG": "DEBUG"},
        )
    finally:
        server.close()
    assert seen and set(seen) == {"Bearer sk-do-not-print"}
    assert "sk-do-not-print" not in proc.stdout + proc.stderr
    assert "sk-do-not-print" not in (tmp_path / "stage1" / "manifest.json").read_text()


def test_the_openai_backend_reuses_its_connections_and_keeps_each_answer_with_its_request():
    server = ChatServer(failures=["timeout", 429])  # a timed-out connection is replaced, not reused
    try:
        backend = OpenAIBackend(server.url, "m", concurrency=3, timeout=1, backoff=0.01)
        prompts = [f"a heron fishing at dawn, take {i}" for i in range(40)]
        requests = [
            Request("question", [{"role": "user", "content": f"Prompt: {p}"}], seed=i) for i, p in enumerate(prompts)
        ]
        answers = backend.complete(requests)
    finally:
        server.close()
    assert [json.loads(a.strip("`json\n"))["question"] for a in answers] == [
        f"Does the video clearly show this: {p}?" for p in prompts
    ]
    assert server.requests == 42  # 40 and the 2 retried
    assert server.connections <= 3 + 1 < server.requests  # the pool's 3, and one to replace the timed-out one


@pytest.mark.slow
def test_killed_midway_and_rerun_every_prompt_exactly_once_and_as_uninterrupted(tmp_path):
    args = [
        *FAST,
        "--num_per_dimension=12",
        "--engine=openai",
        "--llm_model=m",
        "--units_per_shard=1",
        "--llm_concurrency=1",
    ]
    server = ChatServer(delay=0.02)
    try:
        run_stage("stage1", tmp_path / "whole", *args, f"--llm_base_url={server.url}")
        cmd = [
            sys.executable,
            str(REPO / "stage1_prompts/generate.py"),
            f"--run_dir={tmp_path / 'killed'}",
            *args,
            f"--llm_base_url={server.url}",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        units = tmp_path / "killed" / "stage1" / "candidates"
        deadline = time.time() + 120
        while len(list(units.glob("*.tar"))) < 3 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert 3 <= len(list(units.glob("*.tar"))) < 12 and not (tmp_path / "killed/stage1/manifest.json").exists()
        run_stage("stage1", tmp_path / "killed", *args, f"--llm_base_url={server.url}")
    finally:
        server.close()
    whole, resumed = synthetic(tmp_path / "whole"), synthetic(tmp_path / "killed")
    assert resumed == whole and len(whole) >= 16
    assert read_manifest(RunDir(tmp_path / "killed"), "stage1")["num_samples"] == len(whole)


@pytest.mark.slow
def test_real_captions_from_a_video_webdataset_and_from_csv(tmp_path):
    from gigavideo.rundir.shards import ShardWriter, iter_samples

    clips = [make_clip(i) for i in range(3)]
    with ShardWriter(tmp_path / "videos", "stage1_units", "videos", 2) as writer:  # any tar writer will do
        for i, (frames, caption) in enumerate(clips):
            writer.write(
                {
                    "__key__": f"clip{i}",
                    "mp4": encode_mp4(frames, 8),
                    "txt": caption,
                    "json": {"dimension": "-", "unit": i, "candidates": [], "dropped": {}},
                }
            )
    run_stage(
        "stage1",
        tmp_path / "wds",
        "--dimensions=mechanics",
        "--num_per_dimension=2",
        f"--real_captions=wds:{tmp_path}/videos/videos-{{00000..00001}}.tar",
    )
    real = [s for s in iter_samples(RunDir(tmp_path / "wds"), "stage1") if s["json"]["source"] == "real"]
    assert [s["json"]["prompt"] for s in real] == [c for _, c in clips]
    assert real[1]["real.mp4"] == encode_mp4(clips[1][0], 8)
    (tmp_path / "a.mp4").write_bytes(encode_mp4(clips[0][0], 8))
    (tmp_path / "pairs.csv").write_text(f'caption,video\n"{clips[0][1]}",a.mp4\n')
    run_stage(
        "stage1",
        tmp_path / "csv",
        "--dimensions=mechanics",
        "--num_per_dimension=2",
        f"--real_captions={tmp_path / 'pairs.csv'}",
    )
    real = [s for s in iter_samples(RunDir(tmp_path / "csv"), "stage1") if s["json"]["source"] == "real"]
    assert [s["json"]["prompt"] for s in real] == [clips[0][1]]
