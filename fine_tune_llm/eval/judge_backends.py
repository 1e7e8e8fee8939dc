"""The judge models behind eval/judge.py and eval/safety.py: one question each, the next-token log-probs of a few labels.

A judge reads a chat prompt (a list of messages ending with a user turn) and says how likely its answer starts with
each label ("A" / "B", "Yes" / "No"). Verdicts are read from those probabilities, never from sampled text: the same
prompt always gives the same verdict, and a judge that hesitates says so (p near 0.5) instead of flipping a coin.

`load_judge(spec)` picks the backend from the spec:
- `http://...` / `https://...`: an OpenAI-compatible server (vLLM, Ollama, llama.cpp's server). A base URL (`.../v1`)
  uses `/chat/completions` (the server applies the model's chat template); a URL ending in `/completions` uses the
  legacy completions endpoint with a plain-text prompt. `URL#MODEL` names the served model (a URL fragment is never
  sent); without one the server's first `/models` entry is used. The API key comes from FINE_TUNE_LLM_JUDGE_KEY,
  else OPENAI_API_KEY, and never appears in a description, a message or a report;
- a `.gguf` file: llama-cpp-python (the optional `gguf` group);
- anything else: a Hub id or a local model folder through transformers (4-bit on CUDA, bf16/fp32 on CPU).
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..data.chat_template import render_prompt, sanitize
from ..errors import ConfigError, EnvironmentNotReady

KEY_VARIABLES = ("FINE_TUNE_LLM_JUDGE_KEY", "OPENAI_API_KEY")
GGUF_INSTALL_HINT = ("a .gguf judge needs llama-cpp-python, in the optional `gguf` group: make install GROUPS=gguf "
                     "(or pass backend='transformers', which reads a GGUF file too)")
# How many alternatives a server is asked for: enough for "A"/" A"/"B"/" B" to appear for any judge worth asking.
TOP_LOGPROBS = 20


class Judge(Protocol):
    """What eval/judge.py and eval/safety.py need from a judge model."""

    def label_logprobs(self, messages: list[dict[str, str]], labels: Sequence[str]) -> list[float | None]:
        """Log-prob of each label as the first token of the answer (None: a server did not show that label)."""

    def describe(self) -> dict[str, Any]:
        """What judged, for the report: backend and model, never a key."""


def label_variants(label: str) -> tuple[str, ...]:
    """The spellings a judge may start its answer with: "A" and " A" are different tokens in most vocabularies."""
    return (label, " " + label)


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def single_token_ids(encode, labels: Sequence[str], model: str) -> list[list[int]]:
    """For each label, the ids of its one-token spellings; a label no spelling of which is one token, or two labels
    sharing a token, cannot be read from one next-token distribution."""
    ids = []
    for label in labels:
        found = sorted({t[0] for v in label_variants(label) if len(t := encode(v)) == 1})
        if not found:
            raise ConfigError(f"judge {model}: the label {label!r} is not a single token in its vocabulary")
        ids.append(found)
    flat = [i for group in ids for i in group]
    if len(flat) != len(set(flat)):
        raise ConfigError(f"judge {model}: the labels {list(labels)} share a token")
    return ids


# --- transformers -----------------------------------------------------------------------------------------------

class TransformersJudge:
    """A loaded chat model and its tokenizer: one forward pass per prompt, the last position's log-softmax."""

    def __init__(self, model, tokenizer, name: str = "model"):
        if tokenizer.chat_template is None:
            raise ConfigError(f"judge {name} has no chat template: a judge must be an instruction-tuned chat model")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._ids: dict[tuple[str, ...], list[list[int]]] = {}

    @classmethod
    def from_pretrained(cls, source: str, gguf_file: str | None = None) -> TransformersJudge:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..model.hardware import cpu_has_native_bf16
        from ..model.loading import check_model_files

        check_model_files(source)
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        if torch.cuda.is_available():
            from transformers import BitsAndBytesConfig

            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
        else:
            # transformers keeps GGUF weights packed and computes them in float32; others run bf16 where the CPU
            # multiplies it natively (model/hardware.py), else float32.
            dtype = torch.bfloat16 if cpu_has_native_bf16() and not gguf_file else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
        except OSError as exc:
            raise EnvironmentNotReady(f"judge model {source} could not be loaded: {exc}") from None
        return cls(model, tokenizer, name=f"{source}/{gguf_file}" if gguf_file else source)

    def label_logprobs(self, messages: list[dict[str, str]], labels: Sequence[str]) -> list[float | None]:
        import torch

        from ..model.loading import model_device

        ids = self._label_ids(labels)
        prompt = render_prompt(self.tokenizer, messages)  # control strings in the answers are stripped first
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model_device(self.model))
        with torch.inference_mode():
            logits = self.model(**enc, use_cache=False).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1).tolist()
        return [logsumexp([logp[i] for i in group]) for group in ids]

    def _label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        key = tuple(labels)
        if key not in self._ids:
            encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)
            self._ids[key] = single_token_ids(encode, labels, self.name)
        return self._ids[key]

    def describe(self) -> dict[str, Any]:
        quantized = getattr(self.model, "is_loaded_in_4bit", False)
        return {"backend": "transformers", "model": self.name,
                "dtype": "4-bit nf4" if quantized else str(self.model.dtype).removeprefix("torch.")}


# --- llama.cpp --------------------------------------------------------------------------------------------------

# Chat-control strings an answer under judgement must not smuggle into the prompt (ChatML, Gemma, Llama 3).
CONTROL_PATTERN = re.compile(r"<\|[A-Za-z_]{1,30}\|>|<(?:start|end)_of_turn>")


class LlamaCppJudge:
    """A GGUF chat model through llama-cpp-python. Prompts share their start (the rubric, then the question), so
    the KV cache of the common prefix with the previous prompt is kept and only the rest is evaluated."""

    def __init__(self, path: str | Path, n_ctx: int = 4096, n_threads: int | None = None):
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError:
            raise EnvironmentNotReady(GGUF_INSTALL_HINT) from None
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"judge GGUF file not found: {self.path}")
        self._lib = llama_cpp
        # Prompt evaluation gets the same threads as generation (llama-cpp-python's default, half the cores): with
        # every core its default, OpenMP threads spin against each other on a busy machine, many times slower.
        n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads,
                                   n_threads_batch=n_threads, logits_all=False, verbose=False)
        # Freed while the interpreter still runs: llama-cpp-python's own __del__ fails at exit once its library
        # handle is gone (a TypeError printed after every script).
        weakref.finalize(self, self.llm.close)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"judge {self.path} has no chat template: a judge must be an instruction-tuned chat "
                              f"model")
        self._bos = self._text(self.llm.token_bos())
        self._format = Jinja2ChatFormatter(template, self._text(self.llm.token_eos()), self._bos)
        self._ids: dict[tuple[str, ...], list[list[int]]] = {}

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        controls = sorted({m.group(0) for msg in messages for m in CONTROL_PATTERN.finditer(msg["content"])}
                          | ({self._bos} if self._bos else set()), key=len, reverse=True)
        clean = [{"role": m["role"], "content": sanitize(m["content"], controls)} for m in messages]
        text = self._format(messages=clean).prompt
        written_bos = bool(self._bos) and text.startswith(self._bos)  # Gemma's template writes <bos> itself
        return self.llm.tokenize(text.encode(), add_bos=not written_bos, special=True)

    def label_logprobs(self, messages: list[dict[str, str]], labels: Sequence[str]) -> list[float | None]:
        import numpy as np

        ids = self._label_ids(labels)
        tokens = self.prompt_tokens(messages)
        if len(tokens) >= self.llm.n_ctx():
            raise ConfigError(f"judge {self.path}: a prompt of {len(tokens)} tokens does not fit its context of "
                              f"{self.llm.n_ctx()}")
        kept = self._shared_prefix(tokens)
        self.llm.n_tokens = kept  # eval() drops the KV cache after n_tokens first
        self.llm.eval(tokens[kept:])
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self.llm.ctx), shape=(self.llm.n_vocab(),))
        logits = logits.astype(np.float64)
        logp = logits - logsumexp(logits.tolist())
        return [logsumexp([float(logp[i]) for i in group]) for group in ids]

    def _shared_prefix(self, tokens: list[int]) -> int:
        previous = self.llm.input_ids[: self.llm.n_tokens].tolist()
        n = 0
        for a, b in zip(previous, tokens):
            if a != b:
                break
            n += 1
        return min(n, len(tokens) - 1)  # at least one token is evaluated, so the logits are this prompt's

    def _label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        key = tuple(labels)
        if key not in self._ids:
            encode = lambda text: self.llm.tokenize(text.encode(), add_bos=False, special=False)
            self._ids[key] = single_token_ids(encode, labels, str(self.path))
        return self._ids[key]

    def describe(self) -> dict[str, Any]:
        return {"backend": "llama.cpp", "model": self.path.name}


# --- an OpenAI-compatible server --------------------------------------------------------------------------------

class OpenAIJudge:
    """A served model, asked for one token at temperature 0 with the top log-probs of its first position.

    Only the top alternatives come back: a label missing from them is bounded by the smallest log-prob shown (it is
    at most that), and when neither label is shown the verdict is unreadable (None)."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"judge URL {self._shown(url)} is not an http(s) URL")
        if parts.username or parts.password or parts.query:
            raise ConfigError(f"judge URL {self._shown(url)}: put the API key in FINE_TUNE_LLM_JUDGE_KEY, not in "
                              f"the URL")
        path = parts.path.rstrip("/")
        self.chat = not (path.endswith("/completions") and not path.endswith("/chat/completions"))
        if path.endswith("/completions"):
            base, endpoint = path.rsplit("/chat/completions" if self.chat else "/completions", 1)[0], path
        else:
            base, endpoint = path, path + "/chat/completions"
        self._root = f"{parts.scheme}://{parts.netloc}"
        self.base, self.endpoint, self.timeout = base, endpoint, timeout
        self.__key = next((os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), None)
        self.model = model or parts.fragment or self._first_model()

    @staticmethod
    def _shown(url: str) -> str:
        """A URL as messages may show it: no user, password or query (where keys hide)."""
        p = urllib.parse.urlsplit(url)
        return f"{p.scheme}://{p.hostname or ''}{f':{p.port}' if p.port else ''}{p.path}"

    def __repr__(self) -> str:
        return f"OpenAIJudge({self._root}{self.endpoint}, model={self.model!r})"

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._root + path, data=data, headers=headers)
        where = f"judge server {self._root}{path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise EnvironmentNotReady(self._hide(f"{where} answered {exc.code}: {detail}")) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise EnvironmentNotReady(self._hide(f"{where} cannot be reached: {exc}")) from None
        except json.JSONDecodeError:
            raise EnvironmentNotReady(f"{where} did not answer with JSON") from None

    def _hide(self, text: str) -> str:
        return text.replace(self.__key, "<redacted>") if self.__key else text

    def _first_model(self) -> str:
        listed = self._request(self.base + "/models").get("data") or []
        if not listed or not listed[0].get("id"):
            raise ConfigError(f"judge server {self._root}{self.base}/models lists no model: name one as URL#MODEL")
        return str(listed[0]["id"])

    def label_logprobs(self, messages: list[dict[str, str]], labels: Sequence[str]) -> list[float | None]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0}
        if self.chat:
            body.update(messages=messages, logprobs=True, top_logprobs=TOP_LOGPROBS)
        else:
            text = "\n\n".join(m["content"] for m in messages)
            body.update(prompt=f"{text}\n\nVerdict:", logprobs=TOP_LOGPROBS)
        return read_label_logprobs(self._top_logprobs(self._request(self.endpoint, body)), labels)

    def _top_logprobs(self, reply: dict[str, Any]) -> dict[str, float]:
        """token -> log-prob at the answer's first position, from either endpoint's reply shape."""
        try:
            logprobs = reply["choices"][0]["logprobs"]
            if self.chat:
                first = logprobs["content"][0]
                shown = {t["token"]: t["logprob"] for t in first.get("top_logprobs") or []}
                shown.setdefault(first["token"], first["logprob"])
                return shown
            return dict(logprobs["top_logprobs"][0])
        except (KeyError, IndexError, TypeError):
            raise EnvironmentNotReady(f"judge server {self._root}{self.endpoint} sent no log-probs: it must support "
                                      f"`logprobs` (vLLM, llama.cpp's server and recent Ollama do)") from None

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai-compatible", "model": self.model, "url": self._root + self.endpoint}


def read_label_logprobs(shown: dict[str, float], labels: Sequence[str]) -> list[float | None]:
    """Each label's log-prob from a server's top alternatives ("A" and " A" both count as A; case matters)."""
    found = []
    for label in labels:
        values = [lp for token, lp in shown.items() if token.strip() == label]
        found.append(logsumexp(values) if values else None)
    if all(v is None for v in found):
        return found
    floor = min(shown.values())  # a label not shown is at most as likely as the least likely one shown
    return [floor if v is None else v for v in found]


# --- choosing one -----------------------------------------------------------------------------------------------

def load_judge(spec: str, backend: str = "auto", model: str | None = None, timeout: float = 120.0) -> Judge:
    """The judge a spec names: `http(s)://...` a server, `*.gguf` llama.cpp, else transformers (Hub id or folder).

    backend: "auto" (from the spec), or "transformers" to read a `.gguf` file through transformers instead of
    llama.cpp. model: the served model's name for a server (or `URL#MODEL`). Errors name the spec, before any model
    loads where they can.
    """
    spec = str(spec)
    if backend not in ("auto", "transformers"):
        raise ConfigError(f"judge backend {backend!r}: choose auto or transformers")
    if spec.startswith(("http://", "https://")):
        return OpenAIJudge(spec, model=model, timeout=timeout)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"judge GGUF file not found: {path}")
        if backend == "transformers":
            return TransformersJudge.from_pretrained(str(path.parent), gguf_file=path.name)
        return LlamaCppJudge(path)
    if spec == "tiny-gemma":
        from ..model.tiny import tiny_model_dir

        return TransformersJudge.from_pretrained(str(tiny_model_dir()))
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"judge model folder not found: {path}")
    return TransformersJudge.from_pretrained(str(path) if path.exists() else spec)
