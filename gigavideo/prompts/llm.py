"""Text backends for the prompt engine, behind one interface: `complete(requests) -> list[str | None]`.

A request is a chat (a list of {role, content} messages) plus the engine step and its context.
Backends return the raw text of each answer (None when the backend failed after its retries);
the engine parses, validates and re-asks. Backends:

- `template`: no model; answers each step from the dimension's grammar (offline, deterministic).
- `transformers`: a local chat model folder (AutoModelForCausalLM), batched generation.
- `openai`: any OpenAI-compatible server (vLLM, SGLang, ...) through the `openai` client: base URL and
  model by flag, the API key from an environment variable only, bounded concurrency over a pool of
  kept-alive connections, the client's retries (with our backoff base) and timeouts.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field

import torch

from gigavideo.errors import ConfigError
from gigavideo.models.pipeline import torch_dtype
from gigavideo.prompts.dimensions import load_style

log = logging.getLogger("gigavideo.prompts.llm")


@dataclass
class Request:
    step: str  # analogy | augment | question
    messages: list[dict]
    context: dict = field(default_factory=dict)  # what the template backend answers from
    seed: int = 0


class TemplateBackend:
    """Answers each step from the dimension's grammar, in the JSON an LLM is asked for."""

    last_error = None  # what a server backend says when it gave no answer

    name = "template"

    def __init__(self, settings: list[str], cameras: list[str], lighting: list[str]):
        self.settings, self.cameras, self.lighting = settings, cameras, lighting

    def complete(self, requests: list[Request]) -> list[str]:
        return [json.dumps(getattr(self, f"_{r.step}")(r.context, random.Random(r.seed))) for r in requests]

    @staticmethod
    def _analogy(ctx, rng):
        dim = ctx["dimension"]
        subjects = [s["subject"] for s in dim.seeds] + dim.subjects
        actions = [s["action"] for s in dim.seeds] + dim.actions
        out = []
        for _ in range(ctx["count"]):
            seed_index = rng.randrange(len(dim.seeds))
            example = dim.seeds[seed_index]
            # Keep one half of a seed, replace the other from the dimension's pools.
            if rng.random() < 0.5:
                out.append({"subject": rng.choice(subjects), "action": example["action"], "seed_index": seed_index})
            else:
                out.append({"subject": example["subject"], "action": rng.choice(actions), "seed_index": seed_index})
        return {"prompts": out}

    def _augment(self, ctx, rng):
        core = ctx["dimension"].prompt.format(subject=ctx["subject"], action=ctx["action"])
        setting, camera, light = rng.choice(self.settings), rng.choice(self.cameras), rng.choice(self.lighting)
        return {"prompt": f"{setting[0].upper()}{setting[1:]}: {core}. {camera[0].upper()}{camera[1:]}, {light}."}

    @staticmethod
    def _question(ctx, rng):
        return {"question": ctx["dimension"].question.format(subject=ctx["subject"], action=ctx["action"])}


class TransformersBackend:
    """A local chat model; answers are sampled with a per-request seed, so reruns repeat them."""

    last_error = None  # what a server backend says when it gave no answer

    def __init__(
        self,
        path: str,
        device,
        dtype=torch.float32,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.batch_size = device, int(batch_size)
        self.max_new_tokens, self.temperature = int(max_new_tokens), float(temperature)
        self.name = f"transformers:{path}"

    @torch.no_grad()
    def complete(self, requests: list[Request]) -> list[str]:
        out = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            texts = [
                self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                for r in batch
            ]
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
            torch.manual_seed(batch[0].seed)
            generated = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=self.temperature > 0,
                temperature=self.temperature or None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            out += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return out


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server, `concurrency` requests at a time."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60.0,
        temperature: float = 0.8,
        json_mode: bool = True,
        backoff: float = 1.0,
    ):
        if not base_url or not model:
            raise ConfigError("the openai backend needs --llm_base_url and --llm_model")
        from gigavideo.openai_chat import ChatClient  # imported here: the openai package takes ~0.7 s to import

        self.chat = ChatClient(base_url, api_key_env, concurrency, timeout, max_retries, backoff)
        self.model = model
        self.temperature, self.json_mode = float(temperature), bool(json_mode)
        self.name = f"openai:{model}@{base_url}"

    def complete(self, requests: list[Request]) -> list[str | None]:
        return self.chat.map(self._one, requests)

    @property
    def last_error(self) -> str | None:
        return self.chat.last_error

    def _one(self, request: Request) -> str | None:
        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        return self.chat.create(
            request.step,
            parse=message_text,
            model=self.model,
            messages=request.messages,
            temperature=self.temperature,
            seed=request.seed,
            **extra,
        )


def message_text(response: dict) -> str:
    from gigavideo.openai_chat import MalformedAnswer

    try:
        text = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise MalformedAnswer(f"a chat completion of unexpected shape ({err}): {str(response)[:160]}") from None
    if not isinstance(text, str):
        raise MalformedAnswer(f"message content is a {type(text).__name__}, not text: {str(text)[:80]}")
    return text


ENGINES = ("template", "transformers", "openai")


def make_backend(pc, device):
    if pc.engine == "template":
        return TemplateBackend(*load_style(pc.dimensions_dir))
    if pc.engine == "transformers":
        return TransformersBackend(
            pc.llm_path, device, torch_dtype(pc.llm_dtype), pc.llm_batch_size, pc.llm_max_new_tokens, pc.llm_temperature
        )
    if pc.engine == "openai":
        return OpenAIBackend(
            pc.llm_base_url,
            pc.llm_model,
            pc.llm_api_key_env,
            pc.llm_concurrency,
            pc.llm_http_retries,
            pc.llm_timeout,
            pc.llm_temperature,
            backoff=pc.llm_backoff,
        )
    raise ConfigError(f"prompt engine {pc.engine!r} not in {ENGINES}")
