"""Automatic feedback: a frozen vision-language model answers a yes/no question about a video.

P(yes) comes from the next-token logits of the answer tokens, not from parsing generated text.
The `transformers` backend loads a local llava-hf checkpoint with `AutoModelForImageTextToText` and reads the
clip the way its class does (gigavideo/judges/inputs.py): LLaVA-OneVision / LLaVA-Video as one video,
LLaVA-1.5 as frames given as images. The tiny preset builds a random LLaVA-OneVision and loads it the same way.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch

from gigavideo.errors import ConfigError
from gigavideo.judges.inputs import DEFAULT_CLIP_FPS, check_judge_folder, reader_for, sample_indices
from gigavideo.models.pipeline import check_model_dir, torch_dtype
from gigavideo.registry import resolve
from gigavideo.rundir.files import write_atomic
from gigavideo.rundir.layout import RunDir, read_manifest
from gigavideo.tiny.judges import build_tiny_judge

log = logging.getLogger("gigavideo.judges")

ANSWER_SUFFIX = " Answer yes or no."
SERVER_FRAMES = 32  # score.num_frames = 0 with a server: vLLM's default (its --media-io-kwargs set another)


def clip_fps(run: RunDir) -> float:
    """The frame rate of the clips the judge sees: stage 2's render fps, else Wan's."""
    fps = read_manifest(run, "stage2").get("render", {}).get("fps") if run.is_complete("stage2") else None
    return float(fps or DEFAULT_CLIP_FPS)


def clip_shape(run: RunDir) -> tuple[int, int, int, int] | None:
    """(frames, height, width, 3) of stage 2's clips, where its manifest says them."""
    render = read_manifest(run, "stage2").get("render", {}) if run.is_complete("stage2") else {}
    sides = [render.get(k) for k in ("num_frames", "height", "width")]
    return (*sides, 3) if all(isinstance(v, int) and v > 0 for v in sides) else None


def judge_path(score_cfg: dict, run: RunDir) -> Path:
    """`score.judge_path` if set, else (tiny preset) RUN_DIR/models/judge, built once."""
    if score_cfg.get("judge_path"):
        return check_model_dir(
            score_cfg["judge_path"],
            "judge model",
            ("config.json",),
            "Give a local folder of a llava-hf vision-language model "
            "(e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf) with --judge_path.",
        )
    if score_cfg.get("judge") != "tiny":
        raise FileNotFoundError(
            f"judge {score_cfg.get('judge')!r} needs --judge_path to a local model folder "
            "(or --judge=openai with --judge_base_url and --judge_model)"
        )

    return write_atomic(
        run.models / "judge", lambda directory: build_tiny_judge(score_cfg, directory), keep_existing=True
    )


class JudgeAnswerError(ValueError):
    """The judge answered neither yes nor no."""


def yes_no(text: str) -> str | None:
    """'yes' or 'no' from the start of an answer, else None."""
    words = re.findall(r"[a-z]+", text.lower())[:3]
    return next((w for w in words if w in ("yes", "no")), None)


def normalized_reward(p_yes: float, p_no: float) -> float:
    """P(yes | the answer is yes or no): the reward."""
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5


def sample_frames(frames: np.ndarray, count: int) -> list[np.ndarray]:
    return [frames[i] for i in sample_indices(len(frames), min(count, len(frames)))]


class TransformersJudge:
    """A local vision-language model, reading each clip the way its class does (gigavideo/judges/inputs.py: one
    video for LLaVA-OneVision / LLaVA-Video); batched with left padding.

    score_many([(frames, question), ...]) -> [{p_yes, p_no, answer}, ...], where P(yes) and P(no)
    are the full next-token probabilities of the answer words (so P(yes) + P(no) <= 1).
    """

    @classmethod
    def check(cls, score_cfg, run) -> None:
        check_judge_folder(judge_path(score_cfg, run))

    @classmethod
    def load(cls, score_cfg, run, device) -> TransformersJudge:
        return cls(
            judge_path(score_cfg, run),
            device=device,
            dtype=score_cfg["dtype"],
            num_frames=score_cfg["num_frames"],
            batch_size=score_cfg["batch_size"],
            clip_fps=clip_fps(run),
            form=score_cfg["judge_input"],
            clip_shape=clip_shape(run),
        )

    def __init__(
        self,
        path: str | Path,
        device="cpu",
        dtype: str = "float32",
        num_frames: int = 0,
        batch_size: int = 4,
        clip_fps: float = DEFAULT_CLIP_FPS,
        form: str = "video",
        clip_shape: tuple | None = None,
    ):
        from transformers import AutoModelForImageTextToText

        check_judge_folder(Path(path))
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype(dtype))
        self.model.to(device).eval()
        self.reader = reader_for(Path(path), self.model.config, num_frames, clip_fps, form)
        self.device, self.batch_size, self.name = device, int(batch_size), str(path)
        tokenizer = self.reader.tokenizer
        self.yes_ids = self._answer_ids(tokenizer, ("yes", "Yes", " yes", " Yes"))
        self.no_ids = self._answer_ids(tokenizer, ("no", "No", " no", " No"))
        if clip_shape:  # read a blank clip of stage 2's shape: how it sees one is known before the first
            self.reader.inputs([(np.zeros(clip_shape, dtype=np.uint8), "?")])

    @property
    def input(self) -> dict:
        """How the judge saw each clip (form, frames, resolution, visual tokens a question): in the manifests."""
        return self.reader.describe()

    @staticmethod
    def _answer_ids(tokenizer, words) -> list[int]:
        ids = {
            tokenizer.encode(w, add_special_tokens=False)[0]
            for w in words
            if len(tokenizer.encode(w, add_special_tokens=False)) == 1
        }
        ids.discard(tokenizer.unk_token_id)
        if not ids:
            raise ConfigError(f"judge tokenizer has no single-token answer among {words}")
        return sorted(ids)

    @torch.no_grad()
    def score_many(self, items: list[tuple[np.ndarray, str]]) -> list[dict]:
        out = []
        for i in range(0, len(items), self.batch_size):
            batch = [(frames, question + ANSWER_SUFFIX) for frames, question in items[i : i + self.batch_size]]
            inputs = {
                k: v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in self.reader.inputs(batch).items()
            }
            # the next token's logits only: LLaVA-Video's at every one of 12,545 positions would be 3.8 GB (bf16)
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]
            probs = torch.softmax(logits.float(), dim=-1)
            for row in probs:
                p_yes, p_no = row[self.yes_ids].sum().item(), row[self.no_ids].sum().item()
                out.append({"p_yes": p_yes, "p_no": p_no, "answer": "yes" if p_yes >= p_no else "no"})
        return out


class OpenAIJudge:
    """An OpenAI-compatible server with a vision model (e.g. vLLM): the sampled frames go as one H.264 mp4 in a
    `video_url` part (score.judge_input = video), or as one PNG `image_url` part a frame (images).

    P(yes), P(no) come from the answer token's log-probabilities when the server returns them;
    otherwise the answer text decides (1 or 0); an answer that is neither is an error for that sample.
    """

    @classmethod
    def check(cls, score_cfg, run) -> None:
        cls.require_flags(score_cfg["judge_base_url"], score_cfg["judge_model"])

    @staticmethod
    def require_flags(base_url: str, model: str) -> None:
        if not base_url or not model:
            raise ConfigError("the openai judge needs --judge_base_url and --judge_model")

    @classmethod
    def load(cls, score_cfg, run, device) -> OpenAIJudge:
        return cls(
            score_cfg["judge_base_url"],
            score_cfg["judge_model"],
            score_cfg["judge_api_key_env"],
            score_cfg["num_frames"],
            score_cfg["judge_concurrency"],
            score_cfg["judge_timeout"],
            score_cfg["judge_http_retries"],
            score_cfg["judge_backoff"],
            form=score_cfg["judge_input"],
            clip_fps=clip_fps(run),
        )

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        num_frames: int = 8,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        form: str = "video",
        clip_fps: float = DEFAULT_CLIP_FPS,
    ):
        from gigavideo.openai_chat import ChatClient

        self.require_flags(base_url, model)
        self.chat = ChatClient(base_url, api_key_env, concurrency, timeout, max_retries, backoff)
        self.said_no_logprobs = False
        self.model, self.form, self.clip_fps = model, form, float(clip_fps)
        self.num_frames = int(num_frames) or SERVER_FRAMES
        self.name = f"openai:{model}@{base_url}"
        self.input = {"input": form, "frames": self.num_frames, "format": "mp4" if form == "video" else "png"}

    def media(self, frames: np.ndarray) -> list[dict]:
        """The clip as message parts: one mp4 video_url of the sampled frames, over the clip's duration (vLLM decodes
        up to its --media-io-kwargs num_frames, 32 by default, so at most that many are sent), or one PNG a frame."""
        import base64
        import io

        from PIL import Image

        from gigavideo.rundir.video import encode_mp4

        chosen = sample_frames(frames, self.num_frames)
        if self.form == "video":
            fps = max(1, round(len(chosen) * self.clip_fps / len(frames)))  # the sampled frames span the clip
            data = encode_mp4(np.stack(chosen), fps)
            url = "data:video/mp4;base64," + base64.b64encode(data).decode()
            return [{"type": "video_url", "video_url": {"url": url}}]
        parts = []
        for frame in chosen:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            parts.append(
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
                }
            )
        return parts

    def score_many(self, items: list[tuple[np.ndarray, str]]) -> list[dict | JudgeAnswerError]:
        return self.chat.map(lambda item: self._one(*item), items)

    def _one(self, frames, question):
        content = [*self.media(frames), {"type": "text", "text": question + ANSWER_SUFFIX}]
        answer = self.chat.create(
            "judge",
            parse=read_judge_answer,
            model=self.model,
            messages=[{"role": "user", "content": content}],
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=20,
        )
        if answer is None:
            return JudgeAnswerError(f"the judge server kept failing: {self.chat.last_error}")
        text, probs = answer
        if probs["yes"] + probs["no"] > 0:
            answer = "yes" if probs["yes"] >= probs["no"] else "no"
            return {"p_yes": probs["yes"], "p_no": probs["no"], "answer": answer}
        if not self.said_no_logprobs:
            self.said_no_logprobs = True
            log.warning(
                "%s gave no logprobs for yes or no: rewards come from the answer's text, 0 or 1 only (vLLM and "
                "SGLang give them when asked; check the server)",
                self.chat.base_url,
            )
        answer = yes_no(text)
        if answer is None:
            return JudgeAnswerError(f"answer is neither yes nor no: {text[:80]!r}")
        return {"p_yes": float(answer == "yes"), "p_no": float(answer == "no"), "answer": answer}


def read_judge_answer(response: dict) -> tuple[str, dict[str, float]]:
    """The answer's text and the probabilities of "yes" and "no" among its first token's top logprobs (0 where
    the server gave none); MalformedAnswer where a field is missing or of another type, or a logprob is not a
    finite number <= 0."""
    from gigavideo.openai_chat import MalformedAnswer

    probs = {"yes": 0.0, "no": 0.0}
    try:
        choice = response["choices"][0]
        text = choice["message"]["content"] or ""
        top = (choice.get("logprobs") or {}).get("content") or []
        if not isinstance(text, str):
            raise TypeError(f"content is a {type(text).__name__}")
        for cand in top[0].get("top_logprobs", []) if top else []:
            word, logprob = cand["token"].strip().lower(), cand["logprob"]
            if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or not logprob <= 0:
                raise TypeError(f"logprob {str(logprob)[:40]!r} is not a number <= 0")
            if word in probs:
                probs[word] += math.exp(logprob)
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise MalformedAnswer(f"a chat completion of unexpected shape ({err}): {str(response)[:160]}") from None
    return text, probs


# score.judge -> the judge class: check(score_cfg, run) before any work, load(score_cfg, run, device).
JUDGES = {
    "transformers": TransformersJudge,
    "tiny": TransformersJudge,  # a random LLaVA built in RUN_DIR/models/judge
    "openai": OpenAIJudge,
    "toy": "gigavideo.toy.judge:ToyJudge",
}


def check_judge(score_cfg: dict, run: RunDir) -> None:
    """Preflight: the judge the flags name can be built (its model folder, or its server flags)."""
    resolve(JUDGES, score_cfg["judge"], "score.judge").check(score_cfg, run)


def load_judge(score_cfg: dict, run: RunDir, device):
    return resolve(JUDGES, score_cfg["judge"], "score.judge").load(score_cfg, run, device)


def describe_judge(judge) -> str:
    """One line: the judge, its model class, and how it sees a clip (input form, frames, visual tokens a question)."""
    model = getattr(judge, "model", None)
    seen = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (getattr(judge, "input", None) or {}).items())
    return f"judge {judge.name}" + (f" ({type(model).__name__})" if model is not None else "") + f"; {seen}"
