"""Every answer of a server is hostile input: real local HTTP servers that misbehave (tests/chat_server.py), the
real client of stage 1's LLM and stage 3's judge, and the real stage scripts. A bad answer fails that request
(retried as set, then counted and named), never the stage, never a hang; SIGTERM stops a stage at once."""

import os
import signal
import subprocess
import sys
import time

import pytest
from chat_server import MISBEHAVIOURS, ChatServer
from conftest import REPO, SCRIPTS, SMALL, run_stage

from gigavideo.judges.judge import JudgeAnswerError, OpenAIJudge
from gigavideo.openai_chat import MAX_ANSWER_BYTES, ChatClient
from gigavideo.prompts.llm import OpenAIBackend, Request
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.rundir.shards import index_json
from gigavideo.toy.clips import make_clip

AUGMENT = Request("augment", [{"role": "user", "content": "Write a detailed prompt.\nSubject: a fox\nAction: leaps"}])
EXPECTED = {  # what the failure names
    "drip": "within --timeout",
    "drip-headers": "within --timeout",
    "hang": "within --timeout",
    "text": "not JSON (text/plain",
    "binary": "not JSON",
    "not-a-completion": "not a chat completion",
    "huge": f"over the {MAX_ANSWER_BYTES} read",
    "endless": f"over the {MAX_ANSWER_BYTES} bytes read",
    "content-not-text": "message content is a int",
}


@pytest.mark.parametrize("how", sorted(set(MISBEHAVIOURS) - {"bad-logprob"}))
def test_a_misbehaving_server_fails_that_request_within_its_deadline_and_retries_as_set(how):
    server = ChatServer(failures=[how, how])  # the first try and its one retry
    client = OpenAIBackend(server.url, "llm", concurrency=1, max_retries=1, timeout=2, backoff=0.01)
    try:
        started = time.monotonic()
        answers = client.complete([AUGMENT])
        took = time.monotonic() - started
        assert answers == [None] and server.requests == 2
        assert took < 2 * 2 + 2, took  # two tries of at most 2 s each, not a drip's hour
        assert EXPECTED[how] in client.last_error, client.last_error
        assert client.complete([AUGMENT])[0]
    finally:
        server.close()


def test_a_judge_answer_with_a_mistyped_logprob_is_that_videos_failure_after_its_retries():
    server = ChatServer(failures=["bad-logprob", "bad-logprob"])
    judge = OpenAIJudge(server.url, "vlm", num_frames=2, concurrency=1, timeout=5, max_retries=1, backoff=0.01)
    frames = make_clip(0, num_frames=4)[0]
    try:
        first, second = judge.score_many([(frames, "Is there a square?"), (frames, "Is there a circle?")])
    finally:
        server.close()
    assert isinstance(first, JudgeAnswerError) and "logprob 'abc' is not a number <= 0" in str(first)
    assert not isinstance(second, JudgeAnswerError) and 0 <= second["p_yes"] <= 1


def test_a_stop_does_not_wait_for_requests_in_flight():
    server = ChatServer(failures=["hang"] * 4)
    client = ChatClient(server.url, "NO_KEY", concurrency=4, timeout=600, max_retries=5, backoff=1)
    try:
        client.stopping.set()  # as the stage's SIGTERM does, from the caller's thread
        started = time.monotonic()
        assert client.map(lambda _: client.create("judge", model="m", messages=[]), range(4)) == [None] * 4
        assert time.monotonic() - started < 1
    finally:
        server.close()


@pytest.mark.slow
def test_stage3_scores_through_a_server_that_misbehaves_counting_each_bad_answer_as_that_videos_failure(scored_copy):
    """Malformed 200s, a drip and a 50 GB answer: each is one video's failure, named; the stage completes."""
    bad = ["text", "drip", "huge", "bad-logprob"]
    server = ChatServer(failures=bad)
    args = ["--judge=openai", "--judge_model=vlm", "--judge_http_retries=0", "--judge_timeout=3"]
    try:
        url = f"--judge_base_url={server.url}"
        run_stage("stage3", scored_copy, "--overwrite", *args, url, "--judge_concurrency=1")
    finally:
        server.close()
    manifest = read_manifest(RunDir(scored_copy), "stage3")
    assert manifest["samples_failed"] == len(bad) and manifest["num_samples"] == 9
    reasons = " ".join(r["reason"] for r in index_json(RunDir(scored_copy), "stage3").values() if r["status"] != "ok")
    for text in ("not JSON", "within --timeout", "over the", "logprob 'abc'"):
        assert text in reasons, reasons


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_sigterm_ends_a_stage_within_seconds_while_its_requests_hang(stage, scored_copy):
    server = ChatServer(failures=["hang"] * 100)
    flags = {
        "stage1": ["--engine=openai", "--llm_model=llm", f"--llm_base_url={server.url}", "--llm_timeout=600"],
        "stage3": ["--judge=openai", "--judge_model=vlm", f"--judge_base_url={server.url}", "--judge_timeout=600"],
    }[stage]
    cmd = [sys.executable, str(REPO / SCRIPTS[stage]), f"--run_dir={scored_copy}", *SMALL[stage], "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*cmd, *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while server.requests == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert server.requests > 0, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no request"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - sent < 30 and proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    proc.stderr.close()
    # the old outputs come back on a plain rerun: the stopped --overwrite run lost nothing
    assert not RunDir(scored_copy).is_complete(stage)
    run_stage(stage, scored_copy)
    assert RunDir(scored_copy).is_complete(stage)
