"""Stage 3: GGUF files for llama.cpp and Ollama, from the verified merged model.

- Conversion uses llama.cpp's own `convert_hf_to_gguf.py` (with its `conversion/` and `gguf-py/` folders). Without
  a llama.cpp checkout, the same tree is taken from the llama-cpp-python source distribution on PyPI, fetched
  by pip by name and version (the installed llama-cpp-python's), so converter and runtime match.
- Quantization uses llama-cpp-python's binding of llama.cpp's quantizer (`llama_model_quantize`).
- The converter's Gemma class writes CodeGemma's special-token ids (fill-in-the-middle 67-70, end-of-turn 107)
  whatever the vocabulary. They are right only for Gemma's own vocabulary, and llama.cpp ends generation on
  the FIM separator, so each id is checked against its token text and fixed with gguf-py's
  `gguf_new_metadata.py`.
- Every file is then loaded in llama-cpp-python: its end-of-turn token must be the chat template's, the tokens
  that end generation must be special tokens, its tokenizer must match the Hugging Face one on chat prompts,
  and a short greedy answer must end by itself on the end-of-turn token.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EnvironmentNotReady, ReleaseCheckFailed
from ..files import cache_root, human_bytes, read_json, write_json
from ..run import RunDir
from .checks import check_common
from .common import CheckResult, locate_run, release_lock, staged
from .merge import check_merged
from .modelcard import write_card
from .modelfile import default_system_prompt, modelfile_matches, write_modelfile

log = logging.getLogger(__name__)
# The gguf dependency group is optional (llama-cpp-python compiles for ~6 minutes): the Makefile target installs
# it with the build flags that work on every CPU we have seen.
INSTALL_HINT = "GGUF export needs llama-cpp-python, which is not installed: run `make install-gguf` (compiles ~6 min)"
QUANTS = ("q8_0", "q4_k_m")
# Block size of each type: rows whose length is not a multiple fall back to another type (llama-quant.cpp).
K_QUANT_BLOCK = 256
VERIFY_FILE = "verification.json"
PROBE_QUESTIONS = ["I have been feeling anxious about my exams and I can't sleep. What can I do?",
                   "My best friend stopped talking to me and I don't know why.",
                   "How can I stop comparing myself to other people?"]
FIM_KEYS = ("prefix", "suffix", "middle", "fsep", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")


@dataclass
class GGUFFile:
    name: str
    quant: str
    bytes: int
    tensor_types: dict[str, int]
    note: str = ""
    verification: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.verification.get("passed"))


@dataclass
class GGUFResult:
    folder: Path
    files: list[GGUFFile]
    modelfile: Path
    converter: str
    metadata_fixes: list[str]
    modelfile_matches_template: bool | None = None

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.files) and self.modelfile_matches_template is not False

    def summary(self) -> str:
        lines = [f"GGUF -> {self.folder} (converter: {self.converter})"]
        for f in self.files:
            v = f.verification
            tried = v.get("answers_tried", 1)
            lines.append(f"  {f.name}: {human_bytes(f.bytes)}, {f.tensor_types}; eot={v.get('eot_token')!r}, "
                         f"greedy answer to question {tried} stopped on {v.get('stopped_on')!r} after "
                         f"{v.get('new_tokens')} tokens, "
                         f"{'ok' if f.passed else 'FAILED: ' + '; '.join(v.get('failures', []))}"
                         + (f" [{f.note}]" if f.note else ""))
        if self.metadata_fixes:
            lines.append("  metadata fixed: " + "; ".join(self.metadata_fixes))
        if self.modelfile_matches_template is False:
            lines.append("  FAILED: the Modelfile's TEMPLATE renders a prompt different from the chat template's")
        return "\n".join(lines)


def export_gguf(merged_dir: str | Path, out_dir: str | Path | None = None, *, quants: tuple[str, ...] = QUANTS,
                llama_cpp_dir: str | Path | None = None, cache_dir: str | Path | None = None, name: str = "model",
                max_new_tokens: int = 512, overwrite: bool = False) -> GGUFResult:
    """f16 GGUF + quantized copies + Modelfile + card (default: next to the merged folder, in gguf/)."""
    llama_cpp = _llama_cpp()  # first: without the optional gguf group, stop before any work
    merged_dir = merged_folder(merged_dir)
    run = locate_run_for_merged(merged_dir)
    with release_lock(run, "gguf"):
        result = _export_checked(merged_dir, out_dir, run, llama_cpp, quants, llama_cpp_dir, cache_dir, name,
                                 max_new_tokens, overwrite)
    log.info(result.summary())
    return result


def _export_checked(merged_dir: Path, out_dir, run, llama_cpp, quants: tuple[str, ...], llama_cpp_dir, cache_dir,
                    name: str, max_new_tokens: int, overwrite: bool) -> GGUFResult:
    check_merged(merged_dir).raise_if_failed()  # never convert an unverified merge
    if _needs_sp_model(merged_dir) and not (merged_dir / "tokenizer.model").is_file():
        raise ReleaseCheckFailed(f"{merged_dir} has no tokenizer.model, which llama.cpp's converter needs for this "
                                 f"SentencePiece tokenizer: rerun `release merge --tokenizer-model PATH`")
    root = llama_cpp_tree(llama_cpp_dir, cache_dir)
    final = Path(out_dir) if out_dir else merged_dir.parent / "gguf"
    # At least the f16 file, about the size of the bf16 weights; the quantized copies come on top.
    need = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    with staged(final, overwrite, need=need) as out:
        result = _export_into(out, merged_dir, run, root, llama_cpp, quants, name, max_new_tokens)
    result.folder = final
    return result


def merged_folder(path: str | Path) -> Path:
    """A merged model folder, or a run directory holding one in release/merged."""
    path = Path(path).expanduser()
    inside = RunDir.of(path).release_dir("merged")
    return inside if (inside / "config.json").is_file() else path


def _export_into(out: Path, merged_dir: Path, run, root: Path, llama_cpp, quants: tuple[str, ...], name: str,
                 max_new_tokens: int) -> GGUFResult:
    from transformers import AutoTokenizer

    turn_end = _turn_end(merged_dir)
    f16 = out / f"{name}-f16.gguf"
    convert(merged_dir, f16, root)
    fixes = fix_special_tokens(f16, root, turn_end)
    paths = {"f16": f16}
    for q in quants:
        paths[q] = out / f"{name}-{q}.gguf"
        quantize(f16, paths[q], q, llama_cpp)
    probe = probe_for(merged_dir)
    files = []
    for q, path in paths.items():
        types = tensor_types(path)
        files.append(GGUFFile(path.name, q, path.stat().st_size, types, k_quant_note(path, q),
                              verify_gguf(path, probe, max_new_tokens)))
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    modelfile = write_modelfile(out, files, turn_end, default_system_prompt(tok))
    result = GGUFResult(out, files, modelfile, str(root), fixes, modelfile_matches(modelfile, tok))
    write_json(out / VERIFY_FILE, {"converter": str(root.name), "metadata_fixes": fixes,
                                   "modelfile_matches_chat_template": result.modelfile_matches_template,
                                   "questions": PROBE_QUESTIONS,
                                   "files": [asdict(f) for f in files]})
    if not result.passed:
        raise ReleaseCheckFailed(f"GGUF verification failed:\n{result.summary()}")
    _write_gguf_card(out, merged_dir, run, result)
    check_gguf(out).raise_if_failed()
    return result


# --- the llama.cpp tree ------------------------------------------------------------------------------------


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EnvironmentNotReady(INSTALL_HINT) from None
    return llama_cpp


def llama_cpp_tree(llama_cpp_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """A llama.cpp source tree with the converter: the user's checkout, or the llama-cpp-python sdist's copy."""
    if llama_cpp_dir:
        root = Path(llama_cpp_dir).expanduser()
        _require_converter(root, f"--llama-cpp-dir {root}")
        return root
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise EnvironmentNotReady(INSTALL_HINT) from None
    cache = Path(cache_dir).expanduser() if cache_dir else cache_root() / "llama-cpp-python-src"
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        _fetch_sdist(version, cache)
    _require_converter(root, f"the llama-cpp-python {version} source distribution")
    return root


def _require_converter(root: Path, what: str) -> None:
    missing = [p for p in ("convert_hf_to_gguf.py", "conversion", "gguf-py") if not (root / p).exists()]
    if missing:
        raise ConfigError(f"{what} lacks {', '.join(missing)}: need a llama.cpp tree with convert_hf_to_gguf.py "
                          f"and its conversion/ and gguf-py/ folders")


def _fetch_sdist(version: str, cache: Path) -> None:
    """pip download the sdist by name and version (the registry's ordinary client); unpack the converter's part."""
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching llama.cpp's converter: llama-cpp-python==%s source distribution via pip", version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", "--quiet", "-d", str(cache), f"llama-cpp-python=={version}"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    archives = sorted(cache.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not archives:
        raise EnvironmentNotReady(f"could not download the llama-cpp-python {version} source distribution with pip "
                                  f"({proc.stderr.strip()[-400:]}); pass --llama-cpp-dir with a llama.cpp checkout")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        # The converter, its conversion/ package and gguf-py/; not the C++ sources (they are in the wheel).
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and _converter_part(m.name[len(prefix):])]
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(cache, members=members, **kwargs)
    archives[0].unlink()  # 75 MB, mostly C++ sources the installed wheel already holds


def _converter_part(rel: str) -> bool:
    return rel.startswith(("conversion/", "gguf-py/")) or ("/" not in rel and rel.endswith(".py"))


# --- convert, fix, quantize ----------------------------------------------------------------------------------


def convert(model_dir: Path, outfile: Path, root: Path, outtype: str = "f16") -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root / "gguf-py"),
                                                                     os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(outfile),
           "--outtype", outtype]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=str(root))
    if proc.returncode != 0 or not outfile.is_file():
        raise ReleaseCheckFailed(f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}):\n"
                                 f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def read_special_tokens(path: Path) -> tuple[dict[str, int], list[str]]:
    """{kind: id} for every tokenizer.ggml.*_token_id key, and the vocabulary, read from the GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids = {}
    for key, fld in reader.fields.items():
        m = re.fullmatch(r"tokenizer\.ggml\.(\w+)_token_id", key)
        if m:
            ids[m.group(1)] = int(fld.contents())
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = list(tokens.contents()) if tokens is not None else []
    return ids, vocab


def fix_special_tokens(path: Path, root: Path, turn_end: str) -> list[str]:
    """Point eot at the template's turn end; drop FIM ids that name ordinary tokens. Returns what changed."""
    ids, vocab = read_special_tokens(path)
    args, fixes = [], []
    if turn_end in vocab and ids.get("eot") != vocab.index(turn_end):
        old = ids.get("eot")
        args += ["--special-token", "eot", turn_end]
        fixes.append(f"eot_token_id {old} ({_tok(vocab, old)!r}) -> {vocab.index(turn_end)} ({turn_end!r})")
    for kind in FIM_KEYS:
        if kind in ids and "fim" not in _tok(vocab, ids[kind]).lower():
            args += ["--remove-metadata", f"tokenizer.ggml.{kind}_token_id"]
            fixes.append(f"removed {kind}_token_id {ids[kind]} ({_tok(vocab, ids[kind])!r} is not a FIM token)")
    if not args:
        return []
    tmp = path.with_suffix(".fixing.gguf")
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    proc = subprocess.run([sys.executable, str(root / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"),
                           str(path), str(tmp), "--force", *args], check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not tmp.is_file():
        raise ReleaseCheckFailed(f"gguf_new_metadata.py failed on {path}: {(proc.stderr or proc.stdout)[-1500:]}")
    os.replace(tmp, path)
    log.info("fixed GGUF special tokens: %s", "; ".join(fixes))
    return fixes


def _tok(vocab: list[str], i: int | None) -> str:
    return vocab[i] if i is not None and 0 <= i < len(vocab) else f"<id {i}>"


def quantize(src: Path, dst: Path, quant: str, llama_cpp) -> None:
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ConfigError(f"unknown quantization {quant!r}; e.g. q8_0, q6_k, q5_k_m, q4_k_m, q4_0")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, (os.cpu_count() or 1))
    # llama.cpp writes a line per tensor to stderr (file descriptor 2, below Python): keep it aside, show it
    # on failure. tensor_types() and k_quant_note() report what matters.
    with tempfile.TemporaryFile() as log_file:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log_file.seek(0)
        output = log_file.read().decode("utf-8", errors="replace")
    if rc != 0 or not dst.is_file():
        raise ReleaseCheckFailed(f"llama_model_quantize to {quant} failed (return code {rc}):\n{output[-2000:]}")


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


def k_quant_note(path: Path, quant: str) -> str:
    """k-quants pack rows in blocks of 256: llama.cpp stores narrower rows with another type, tensor by tensor.
    Say how many weight tensors that hit, so a q4_k_m of a small model is not mistaken for a real one."""
    from gguf import GGUFReader

    if "_k" not in quant:
        return ""
    weights = [t for t in GGUFReader(str(path)).tensors if t.tensor_type.name not in ("F32", "F16", "BF16")]
    narrow = [t for t in weights if int(t.shape[0]) % K_QUANT_BLOCK]
    if not narrow:
        return ""
    widths = sorted({int(t.shape[0]) for t in narrow})
    stored = sorted({t.tensor_type.name for t in narrow})
    return (f"{len(narrow)} of {len(weights)} weight tensors have rows of {', '.join(map(str, widths))} values, "
            f"not a multiple of {K_QUANT_BLOCK}: llama.cpp stored them as {', '.join(stored)} instead of a k-quant")


# --- verification -------------------------------------------------------------------------------------------


def _turn_end(model_dir: Path) -> str:
    from transformers import AutoTokenizer

    from ..data.chat_template import turn_end

    return turn_end(AutoTokenizer.from_pretrained(str(model_dir)))


def _needs_sp_model(model_dir: Path) -> bool:
    """llama.cpp's Gemma converters read tokenizer.model only; Llama-family ones fall back to tokenizer.json."""
    conf = read_json(model_dir / "config.json") or {}
    return str(conf.get("model_type", "")).startswith("gemma")


@dataclass
class Probe:
    """What each GGUF is checked with: chat prompts tokenized by the Hugging Face tokenizer, and its specials."""

    prompts: list[tuple[str, list[int]]]
    turn_end: str
    specials: set[str]


def probe_for(model_dir: Path) -> Probe:
    from transformers import AutoTokenizer

    from ..data.chat_template import build_messages, control_strings, render_prompt, turn_end

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rendered = [render_prompt(tok, build_messages(q)) for q in PROBE_QUESTIONS]
    return Probe([(p, tok(p, add_special_tokens=False)["input_ids"]) for p in rendered], turn_end(tok),
                 set(control_strings(tok)))


def verify_gguf(path: Path, probe: Probe, max_new_tokens: int = 512) -> dict[str, Any]:
    """Load in llama-cpp-python; check end-of-turn, end-of-generation tokens, tokenizer, and greedy answers.

    Answers are generated for the probe questions in turn until one ends by itself: one is enough to show the
    file stops at the end of its turn (a small model may loop on another), and it keeps the check short."""
    llama_cpp = _llama_cpp()
    failures: list[str] = []
    longest = max(len(ids) for _, ids in probe.prompts)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, longest + max_new_tokens + 8),
                          n_threads=max(1, os.cpu_count() or 1), seed=0, verbose=False)
    try:
        vocab = llm._model.vocab
        eot = llama_cpp.llama_vocab_eot(vocab)
        eot_text = _piece(llm, eot)
        if eot_text != probe.turn_end:
            failures.append(f"end-of-turn token is {eot_text!r} (id {eot}), expected {probe.turn_end!r}")
        eog = {i: _piece(llm, i) for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
        stray = {i: t for i, t in eog.items() if t not in probe.specials}
        if stray:
            failures.append(f"ordinary (non-special) tokens end generation: {stray}")
        mismatched = [n for n, (text, ids) in enumerate(probe.prompts)
                      if llm.tokenize(text.encode(), add_bos=False, special=True) != ids]
        if mismatched:
            failures.append(f"llama.cpp tokenizes {len(mismatched)} of {len(probe.prompts)} chat prompts "
                            f"differently from the Hugging Face tokenizer")
        answers = []
        for _, ids in probe.prompts:
            answers.append(_greedy_answer(llm, llama_cpp, ids, max_new_tokens))
            if answers[-1]["stopped_on"] is not None:
                break
        wrong = [a["stopped_on"] for a in answers if a["stopped_on"] not in (None, probe.turn_end)]
        if wrong:
            failures.append(f"answers ended on {wrong}, not {probe.turn_end!r}")
        elif answers[-1]["stopped_on"] is None:
            failures.append(f"none of {len(answers)} greedy answers ended within {max_new_tokens} tokens")
        last = answers[-1]
        return {"passed": not failures, "failures": failures, "eot_token": eot_text, "eot_id": eot,
                "metadata_eot_id": _int_or_none(llm.metadata.get("tokenizer.ggml.eot_token_id")),
                "end_of_generation_tokens": sorted(eog.values()), "tokenizer_matches": not mismatched,
                "chat_template_in_metadata": "tokenizer.chat_template" in llm.metadata,
                "answers_tried": len(answers), "new_tokens": last["new_tokens"], "stopped_on": last["stopped_on"],
                "answers": answers}
    finally:
        llm.close()


def _greedy_answer(llm, llama_cpp, prompt_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    vocab = llm._model.vocab
    new: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                              reset=True):
        new.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(new) >= max_new_tokens:
            break
    stopped = bool(new) and llama_cpp.llama_vocab_is_eog(vocab, new[-1])
    return {"new_tokens": len(new), "stopped_on": _piece(llm, new[-1]) if stopped else None,
            "answer": llm.detokenize(new[:-1] if stopped else new).decode("utf-8", errors="replace")}


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None and str(value).lstrip("-").isdigit() else None


def _piece(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


# --- Modelfile, card, check ---------------------------------------------------------------------------------


def _write_gguf_card(out: Path, merged_dir: Path, run, result: GGUFResult) -> None:
    card = read_json(merged_dir / "parity.json") or {}
    rows = ["| file | size | tensor types | end of turn | greedy answer ended on | check |", "|---|---|---|---|---|---|"]
    for f in result.files:
        v = f.verification
        types = ", ".join(f"{t} x{n}" for t, n in sorted(f.tensor_types.items()))
        rows.append(f"| `{f.name}` | {human_bytes(f.bytes)} | {types} | `{v.get('eot_token')}` | "
                    f"`{v.get('stopped_on')}` after {v.get('new_tokens')} tokens (question {v.get('answers_tried', 1)}) | "
                    f"{'passed' if f.passed else 'FAILED'} |")
    notes = [f"- {f.name}: {f.note}" for f in result.files if f.note]
    notes += [f"- metadata fixed after conversion: {x}" for x in result.metadata_fixes]
    section = "\n".join([
        "## GGUF files and verification", "",
        (f"Converted from the merged bf16 model (parity with base + adapter: "
        f"{'passed' if card.get('passed') else 'see the merged release'}) with llama.cpp's `convert_hf_to_gguf.py`, "
        f"quantized with llama.cpp's quantizer. Each file was loaded in llama-cpp-python: end-of-turn token, "
        f"tokens that end generation, tokenization of chat prompts against the Hugging Face tokenizer, and a "
        f"greedy answer that must end by itself (probe questions tried in turn until one does; "
        f"`{VERIFY_FILE}` has the answers)."), "", *rows, *([""] + notes if notes else []), "",
        f"Details in `{VERIFY_FILE}`. The `Modelfile` stops on the end-of-turn token.",
    ])
    summary = (f"GGUF files of `{run.base_id}` with a LoRA adapter merged in, for llama.cpp, Ollama and "
               f"LM Studio.")
    write_card(out, "gguf", run, summary, license=_card_value(merged_dir, "license"),
               dataset=(_card_value(merged_dir, "datasets") or [None])[0], extra_sections=[section])


def locate_run_for_merged(merged_dir: Path):
    """The run a merged folder came from: its release/ parent's run, else its training_config.yaml."""
    for candidate in (merged_dir.parent.parent, merged_dir.parent):
        if (RunDir.of(candidate).adapter_dir / "adapter_config.json").is_file():
            return locate_run(candidate, _card_value(merged_dir, "base_model"))
    raise ConfigError(f"cannot find the training run of {merged_dir}: expected it at RUN/release/merged")


def _card_value(folder: Path, key: str):
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(folder / "README.md").data.to_dict().get(key)
    except Exception:  # noqa: BLE001 - no card or an unreadable one: the value is unknown
        return None


def check_gguf(folder: str | Path) -> CheckResult:
    """GGUF headers (end-of-turn token), Modelfile (FROM, stop), recorded verification of the same files."""
    folder = Path(folder)
    result = CheckResult(folder, "GGUF")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        result.errors.append("no .gguf files")
    modelfile = folder / "Modelfile"
    stops: list[str] = []
    if not modelfile.is_file():
        result.errors.append("Modelfile is missing")
    else:
        text = modelfile.read_text()
        stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)
        m = re.search(r"^FROM \./(\S+)$", text, re.MULTILINE)
        if not m or not (folder / m.group(1)).is_file():
            result.errors.append("Modelfile's FROM does not name a .gguf file in this folder")
    for path in ggufs:
        try:
            ids, vocab = read_special_tokens(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a failed check, with its cause
            result.errors.append(f"{path.name} does not read as GGUF ({type(exc).__name__}: {exc})")
            continue
        if "eot" not in ids:
            result.errors.append(f"{path.name}: no end-of-turn token in the metadata")
        elif modelfile.is_file() and _tok(vocab, ids["eot"]) not in stops:
            result.errors.append(f"Modelfile has no PARAMETER stop \"{_tok(vocab, ids['eot'])}\" ({path.name}'s "
                                 f"end-of-turn token): Ollama would talk past the end of its turn")
    verified = read_json(folder / VERIFY_FILE)
    if verified is None:
        result.errors.append(f"{VERIFY_FILE} is missing: the files were not verified (run `release gguf`)")
    else:
        records = {f.get("name"): f for f in verified.get("files", []) if isinstance(f, dict)}
        for path in ggufs:
            rec = records.get(path.name)
            if rec is None:
                result.errors.append(f"{path.name} was not verified")
            elif rec.get("bytes") != path.stat().st_size:
                result.errors.append(f"{path.name} changed since it was verified")
            elif not (rec.get("verification") or {}).get("passed"):
                result.errors.append(f"{path.name} failed verification: {rec['verification'].get('failures')}")
    check_common(result, "gguf")
    return result
