"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the openai backend's tests.

It answers the engine's three steps deterministically from the request text, and can be told to
fail: `failures` is a list of what to do with the first requests (429, 500, "timeout", "garbage", or one of
MISBEHAVIOURS: a hostile server's answers).
It speaks HTTP/1.1 with keep-alive, as vLLM and SGLang do, and counts the TCP connections it accepts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gigavideo.rundir.video import decode_mp4

ANIMALS = ["a fox", "a heron", "a goat", "a seal", "an otter", "a lynx", "a crane", "a mule", "a badger", "a moose"]
PLACES = [
    "in a misty valley at dawn",
    "on a frozen lake at noon",
    "in a desert at dusk",
    "beside a waterfall",
    "in a city park at night",
    "on a windy beach",
    "inside a barn",
    "on a mountain ridge in fog",
]
CAMERAS = ["wide shot, static camera", "close-up, handheld", "aerial view, slow pan", "low angle, tracking shot"]
VERBS = [
    "leaps over a log",
    "wades through a stream",
    "climbs a rocky slope",
    "rolls in the snow",
    "shakes off water",
    "slides down a muddy bank",
    "balances on a fence",
    "digs under a root",
    "swims against the current",
]


def answer(text: str, seed: int = 0) -> dict:
    """Deterministic in (text, seed), as a sampling LLM with a fixed seed would be."""
    digest = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest(), 16)
    if "new, varied prompts" in text:
        count = int(re.search(r"Write (\d+) new", text).group(1))
        return {
            "prompts": [
                {
                    "subject": ANIMALS[(digest >> (4 * i)) % len(ANIMALS)],
                    "action": VERBS[(digest >> (4 * i + 2)) % len(VERBS)],
                }
                for i in range(count)
            ]
        }
    if "detailed prompt" in text:
        subject = re.search(r"Subject: (.*)", text).group(1)
        action = re.search(r"Action: (.*)", text).group(1)
        return {
            "prompt": f"{subject.capitalize()} {action} {PLACES[digest % len(PLACES)]}; "
            f"{CAMERAS[(digest >> 8) % len(CAMERAS)]}, variant {digest % 997}."
        }
    prompt = re.search(r"Prompt: (.*)", text).group(1)
    return {"question": f"Does the video clearly show this: {prompt[:60]}?"}


VLLM_NUM_FRAMES = 32  # what vLLM decodes a video_url to unless started with --media-io-kwargs


def video_frames(content: list[dict]) -> int | None:
    """The frames of the one video part, checked against the shape vLLM documents (`{"type": "video_url",
    "video_url": {"url": "data:video/mp4;base64,..."}}`, one video a prompt), or None where frames came as PNGs."""
    videos = [c for c in content if c["type"] == "video_url"]
    images = [c for c in content if c["type"] == "image_url"]
    if not videos:
        assert images and all(c["image_url"]["url"].startswith("data:image/png;base64,") for c in images)
        return None
    assert len(videos) == 1 and not images, "vLLM is started with --limit-mm-per-prompt '{\"video\": 1}'"
    url = videos[0]["video_url"]["url"]
    assert url.startswith("data:video/mp4;base64,")
    frames, _ = decode_mp4(base64.b64decode(url.split(",", 1)[1]))
    assert 1 <= len(frames) <= VLLM_NUM_FRAMES
    return len(frames)


def judge_answer(body: dict, with_logprobs: bool, seen: list) -> dict:
    """A vision judge: the clip arrives as one video part (or as image parts); the answer depends only on the
    question text. `seen` gets each video's frame count."""
    content = body["messages"][-1]["content"]
    seen.append(video_frames(content))
    question = next(c["text"] for c in content if c["type"] == "text")
    p_yes = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 1000 / 1000 * 0.9
    p_no = 0.95 - p_yes
    message = {"role": "assistant", "content": "Yes" if p_yes >= p_no else "No"}
    choice = {"message": message}
    if with_logprobs:
        top = [
            {"token": "Yes", "logprob": math.log(p_yes)},
            {"token": "No", "logprob": math.log(p_no)},
            {"token": "Maybe", "logprob": math.log(0.05)},
        ]
        choice["logprobs"] = {"content": [{"token": message["content"], "logprob": 0.0, "top_logprobs": top}]}
    return {"choices": [choice]}


MISBEHAVIOURS = {
    "drip": "a valid answer, one byte a second",
    "drip-headers": "a status line, then one header line a second, for ever",
    "hang": "no answer at all",
    "text": "200 with a text/plain body",
    "binary": "200 with bytes that are not UTF-8",
    "not-a-completion": "200 with JSON that is not a chat completion",
    "huge": "200 declaring a 50 GB body, and sending zeros",
    "endless": "200 with a chunked body of zeros that never ends",
    "bad-logprob": "a judge answer whose logprob is a string",
    "content-not-text": "an answer whose message content is a number",
}


class ChatServer:
    def __init__(self, failures=(), delay: float = 0.0, judge_logprobs: bool = True, port: int = 0):
        self.failures, self.delay, self.requests, self.connections = list(failures), delay, 0, 0
        self.judge_logprobs = judge_logprobs
        self.video_frames: list[int | None] = []  # per judge request: the frames of its video (None: PNG frames)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one handler serves every request of a connection

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def log_message(self, *args):
                pass

            def do_GET(self):  # what a health check asks, as of vLLM: the served models
                data = json.dumps({"object": "list", "data": [{"id": "vlm", "object": "model"}]}).encode()
                self.send_response(200 if self.path.rstrip("/").endswith("/v1/models") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    action = server.failures.pop(0) if server.failures else None
                if server.delay:
                    time.sleep(server.delay)
                if action in (429, 500):
                    self.send_response(action)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "timeout":
                    time.sleep(3)
                if action in MISBEHAVIOURS and action not in ("bad-logprob", "content-not-text"):
                    try:
                        self.misbehave(action, body)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return
                if isinstance(body["messages"][-1]["content"], list):
                    reply = judge_answer(body, server.judge_logprobs, server.video_frames)
                    if action == "garbage":
                        reply = {"choices": [{"message": {"role": "assistant", "content": "Perhaps."}}]}
                    if action == "bad-logprob":
                        reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] = "abc"
                else:
                    content = (
                        "I cannot help with that."
                        if action == "garbage"
                        else "```json\n"
                        + json.dumps(answer(body["messages"][-1]["content"], body.get("seed", 0)))
                        + "\n```"
                    )
                    reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                if action == "content-not-text":
                    reply["choices"][0]["message"]["content"] = 42
                data = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def misbehave(self, action, body):
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "yes"}}]}).encode()
                if action == "hang":
                    server.closed.wait()
                    return
                if action == "drip-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    while not server.closed.wait(1):
                        self.wfile.write(b"X-Drip: 1\r\n")
                        self.wfile.flush()
                    return
                data, kind, length = {
                    "drip": (reply, "application/json", len(reply)),
                    "text": (b"Internal error, try later", "text/plain", None),
                    "binary": (b"\xff\xfe\x00\x81 not text", "application/json", None),
                    "not-a-completion": (b"[1, 2, 3]", "application/json", None),
                    "huge": (b"", "application/json", 50 * 10**9),
                    "endless": (b"", "application/json", -1),
                }[action]
                self.send_response(200)
                self.send_header("Content-Type", kind)
                if length == -1:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                if action == "drip":
                    for byte in data:
                        if server.closed.wait(1):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                elif action in ("huge", "endless"):
                    zeros = b"0" * 2**20
                    while not server.closed.is_set():
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(zeros), zeros) if length == -1 else zeros)
                else:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":  # a stand-in for `vllm serve ... --port N` (slurm/_common.sh's judge server)
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup", type=float, default=0.0, help="seconds before it listens (loading weights)")
    parser.add_argument("--fail", action="store_true", help="exit at once, as a server that cannot load does")
    args = parser.parse_args()
    if args.fail:
        print("error: the model does not fit in memory", file=sys.stderr)
        sys.exit(1)
    time.sleep(args.startup)
    server = ChatServer(port=args.port)
    print(f"serving on {server.url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)
