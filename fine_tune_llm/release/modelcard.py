"""Model cards (README.md) for the three release folders: Hub metadata plus a body people can act on.

The metadata is what the Hub indexes (base_model, library_name, datasets, license, tags, pipeline_tag); the
body says what the model was tuned on and how, how it measured, what it cannot do, and where to find help.
`validate_card` checks a card offline: huggingface_hub's own parser (ModelCard) plus the keys we require, since
the Hub's validation endpoint needs a network.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError
from ..eval import behaviour_report, harness_report
from ..model.tiny import TINY_NAME
from ..run import ADAPTER_CONFIG_FILE
from .common import RunFiles, is_hub_id

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("base_model", "library_name", "license", "tags", "pipeline_tag")
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
# Licences of the bases we ship presets for; anything else must be named by the user.
KNOWN_LICENSES = {"google/gemma": "gemma", "HuggingFaceTB/SmolLM2": "apache-2.0", "tiny-gemma": "apache-2.0"}
TAGS = ["lora", "qlora", "peft", "sft", "trl", "fine-tune-llm"]
PSYCHOLOGY_TAGS = ["psychology", "mental-health", "empathy"]
SAFETY_HEADING = "## Safety"
SAFETY_NOTE = """\
This model is **not a substitute for professional care**. It is a language model tuned to sound supportive; it
can be wrong, miss warning signs, or give harmful advice, and it cannot act in an emergency. Do not use it to
diagnose or treat anyone, and do not put it in front of people in distress without human oversight.

If you or someone you know is in crisis or thinking about suicide, contact local emergency services now
(112 in the EU, 999 in the UK, 911 in the US) or a crisis line: in the US call or text **988** (Suicide & Crisis
Lifeline); in the UK and Ireland call Samaritans on **116 123**; elsewhere find a free, confidential helpline
at https://findahelpline.com.
"""
# report.json metrics worth a row in the card, in this order; any other numeric metric follows.
EVAL_ROWS = [
    ("perplexity", "Perplexity on held-out answers (lower is better)"),
    ("bits_per_byte", "Bits per byte (lower is better)"),
    ("accuracy_normalized", "Prefers the empathetic over the judgmental answer (length-normalized)"),
    ("accuracy_sum", "Preference accuracy, raw sum (length-biased)"),
    ("mean_margin", "Mean margin, nats/token (chosen - rejected)"),
]


def license_for(base: str, explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    return next((lic for prefix, lic in KNOWN_LICENSES.items() if base.startswith(prefix)), None)


def require_license(run: RunFiles, explicit: str | None = None) -> str:
    """The card's licence, checked before a stage does any heavy work."""
    lic = license_for(run.base_id, explicit)
    if lic is None:
        hint = ("" if is_hub_id(run.base_id) else " and --base-model-id with its Hub id (training loaded it from "
                f"{run.cfg.base_model})")
        raise ConfigError(f"no known licence for base model {run.base_id!r}: pass license= (--license) with its "
                          f"Hub licence id (e.g. apache-2.0, gemma, llama3){hint}")
    return lic


def dataset_id(cfg: TrainConfig, explicit: str | None = None) -> str | None:
    """The Hub id of the training data; None for local files unless the user names their Hub copy."""
    if explicit:
        return explicit
    return cfg.dataset if is_hub_id(cfg.dataset) else None


def is_psychology(cfg: TrainConfig) -> bool:
    return cfg.dataset == "sample" or "psych" in cfg.dataset.lower()


def metadata(cfg: TrainConfig, base: str, kind: str, license: str | None, dataset: str | None) -> dict[str, Any]:
    tags = list(TAGS) + (PSYCHOLOGY_TAGS if is_psychology(cfg) else [])
    if kind == "gguf":
        tags += ["gguf", "llama.cpp", "ollama"]
    meta: dict[str, Any] = {
        "base_model": base,
        "library_name": LIBRARY[kind],
        "license": license,
        "datasets": [dataset] if dataset else None,
        "language": ["en"],
        "tags": tags,
        "pipeline_tag": "text-generation",
        # The Hub's name for a model derived from base_model by further training (merged or not).
        "base_model_relation": "adapter" if kind == "adapter" else ("quantized" if kind == "gguf" else "finetune"),
    }
    return {k: v for k, v in meta.items() if v is not None}


def render_card(meta: dict[str, Any], body: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n{body.strip()}\n")
    return str(card)


def validate_card(path: Path, kind: str) -> tuple[list[str], list[str], dict[str, Any]]:
    """(errors, warnings, metadata) of a README.md, checked offline."""
    from huggingface_hub import ModelCard

    errors: list[str] = []
    warnings: list[str] = []
    if not path.is_file():
        return [f"{path.name} is missing (the model card)"], warnings, {}
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("---"):
        return [f"{path.name} has no YAML metadata block"], warnings, {}
    try:
        data = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    except Exception as exc:  # noqa: BLE001 - YAML syntax, a non-mapping block, malformed eval results
        return [f"{path.name}: metadata does not parse ({type(exc).__name__}: {exc})"], warnings, {}
    for key in REQUIRED_KEYS:
        if not data.get(key):
            errors.append(f"{path.name}: metadata has no {key!r}")
    if data.get("library_name") and data["library_name"] != LIBRARY[kind]:
        errors.append(f"{path.name}: library_name is {data['library_name']!r}, expected {LIBRARY[kind]!r}")
    for key in ("tags", "datasets", "language"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            errors.append(f"{path.name}: {key!r} must be a list of strings")
    if data.get("pipeline_tag") not in (None, "text-generation"):
        errors.append(f"{path.name}: pipeline_tag is {data['pipeline_tag']!r}, expected 'text-generation'")
    if data.get("license") == "other" and not (data.get("license_name") and data.get("license_link")):
        errors.append(f"{path.name}: license 'other' needs license_name and license_link")
    if SAFETY_HEADING not in text:
        errors.append(f"{path.name}: no '{SAFETY_HEADING}' section")
    base = data.get("base_model")
    # The offline demo model has no Hub page, nor has the sample it trains on: a hint to link them asks the
    # impossible, so the two hints below are for real bases only.
    toy = base == TINY_NAME
    if isinstance(base, str) and not is_hub_id(base) and not toy:
        warnings.append(f"base_model {base!r} is not a Hub model id: pass base_model_id= (--base-model-id) so "
                        f"the Hub links the base model")
    if not data.get("datasets") and not toy:
        warnings.append("no 'datasets' in the metadata (local training data): pass dataset_id= (--dataset-id) "
                        "with the data's Hub id to link it")
    return errors, warnings, data


# --- body sections ------------------------------------------------------------------------------------------


def data_section(cfg: TrainConfig, dataset: str | None, split_sizes: dict[str, int] | None,
                 data: dict[str, Any] | None = None) -> str:
    if dataset:
        source = f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    elif cfg.dataset == "sample":
        source = "the 160-row sample shipped with fine-tune-llm (`fine_tune_llm/data/assets/sample_psychology.jsonl`)"
    else:
        source = f"a local file, `{Path(cfg.dataset).name}`"
    lines = ["## Training data", "", f"Source: {source}."]
    if is_psychology(cfg):
        lines += ["", ("Each row holds a question about emotional or mental-health difficulties and two answers: "
                  "`response_j`, empathetic and supportive, which the model was trained on, and `response_k`, "
                  "judgmental or dismissive, which was only used to evaluate whether the model prefers the "
                  "empathetic answer.")]
    if data and data.get("format"):
        lines += ["", (f"Read as format `{data['format']}`: {data.get('rows', 0):,} rows after dropping duplicates, "
                       f"{data.get('multi_turn', 0):,} of them multi-turn conversations, "
                       f"{data.get('assistant_turns', 0):,} assistant turns.")]
    if split_sizes:
        sizes = ", ".join(f"{name} {n:,}" for name, n in split_sizes.items())
        lines += ["", (f"Rows per split ({sizes}) after dropping duplicates; the split is by question (for a "
                       f"conversation, its user turns), so no question or conversation appears in two splits "
                       f"(seed {cfg.seed}).")]
    return "\n".join(lines)


def method_section(cfg: TrainConfig, base: str) -> str:
    quant = {"4bit": "4-bit NF4 with double quantization (QLoRA)", "8bit": "8-bit (LLM.int8)",
             "none": "unquantized"}[cfg.quantization]
    return "\n".join([
        "## Method", "",
        (f"Supervised fine-tuning with LoRA adapters on every linear projection of `{base}`, whose "
        f"frozen weights were loaded {quant}; compute in {cfg.dtype}. Each example is the conversation rendered "
        f"with the model's chat template; the loss covers only "
        f"{'the final answer' if cfg.train_on == 'last' else 'each assistant answer'} and its end-of-turn token, "
        f"never the system or user turns. Trained with TRL's SFTTrainer by fine-tune-llm (preset `{cfg.preset}`)."),
        *([] if cfg.stage != "dpo" else ["", (
            f"Then a preference stage: the SFT adapter was trained further with TRL's DPOTrainer (loss "
            f"`{cfg.loss_type}`, beta {cfg.beta:g}, learning rate {cfg.learning_rate:g}) on pairs of the same "
            f"training prompts, chosen = {'the empathetic answer' if is_psychology(cfg) else 'the trained answer'}, "
            f"rejected = {'the judgmental one' if is_psychology(cfg) else 'the rejected one'}, the reference "
            f"policy being the SFT model itself; same chat template and answer masks. SFT run: "
            f"`{Path(cfg.sft_run or '').name}`.")]),
    ])


def hyperparameter_section(cfg: TrainConfig, run: RunFiles) -> str:
    rows = [
        ("LoRA rank r / alpha / dropout", f"{cfg.lora_r} / {cfg.lora_alpha} / {cfg.lora_dropout}"),
        ("LoRA target modules", ", ".join(cfg.target_modules)),
        ("Base weights during training", cfg.quantization),
        ("Learning rate, schedule, warm-up", f"{cfg.learning_rate:g}, {cfg.lr_scheduler}, {cfg.warmup_ratio:g}"),
        ("Epochs / max steps", f"{cfg.num_epochs:g} / {cfg.max_steps}"),
        ("Batch size x gradient accumulation", f"{cfg.batch_size} x {cfg.grad_accum}"),
        ("Max sequence length", str(cfg.max_length)),
        ("Optimizer, grad-norm clip", f"{cfg.optim}, {cfg.max_grad_norm:g}"),
        ("Compute dtype", cfg.dtype),
        ("Seed", str(cfg.seed)),
    ]
    state = training_state(run)
    if state:
        rows += [(k, v) for k, v in state.items()]
    lines = ["## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"The full settings are in `{ADAPTER_CONFIG_FILE}`." if (run.adapter_dir / ADAPTER_CONFIG_FILE)
              .is_file() else ""]
    return "\n".join(lines).rstrip()


def training_state(run: RunFiles) -> dict[str, str]:
    """Steps and final losses from trainer_state.json, when the run kept it."""
    if run.run is None:
        return {}
    state = run.run.trainer_state() or {}
    history = state.get("log_history") if isinstance(state.get("log_history"), list) else []
    out: dict[str, str] = {}
    if isinstance(state.get("global_step"), int):
        out["Optimizer steps"] = str(state["global_step"])
    train = [h["loss"] for h in history if isinstance(h, dict) and _num(h.get("loss"))]
    evals = [h["eval_loss"] for h in history if isinstance(h, dict) and _num(h.get("eval_loss"))]
    if train:
        out["Training loss, first -> last logged"] = f"{train[0]:.4f} -> {train[-1]:.4f}"
    if evals:
        out["Validation loss, first -> last eval"] = f"{evals[0]:.4f} -> {evals[-1]:.4f}"
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def evaluation_section(run: RunFiles) -> str:
    """The numbers of report.json, one column per model, read defensively: any field may be missing."""
    head = ["## Evaluation", ""]
    report = run.run.report() if run.run else None
    metrics = report.get("metrics") if report else None
    base = metrics.get("base") if isinstance(metrics, dict) else None
    tuned = metrics.get("tuned") if isinstance(metrics, dict) else None
    if not (isinstance(base, dict) and isinstance(tuned, dict)):
        return "\n".join([*head, ("No evaluation report was found for this run (`fine-tune-llm evaluate RUN_DIR` "
                                   "writes one): the numbers above are training and validation losses only.")])
    labels = report.get("columns") if isinstance(report.get("columns"), dict) else {"base": "base", "tuned": "tuned"}
    names = [n for n in labels if isinstance(metrics.get(n), dict)]
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    split = settings.get("split", "held-out")
    n = base.get("answers")
    lines = head + ["Base model vs " + " / ".join(labels[k] for k in names[1:]) + f" on the held-out **{split}** split"
                    + (f" ({n} answers" + (f", {base['pairs']} preference pairs)" if base.get("pairs") else ")")
                       if isinstance(n, int) else "") + ", from the run's `report.json`"
                    + (f"; {settings['weights']}" if settings.get("weights") else "") + ".", "",
                    "| metric | " + " | ".join(labels[k] for k in names) + " |", "|---|" + "---|" * len(names)]
    row_labels = dict(EVAL_ROWS)
    keys = [k for k, _ in EVAL_ROWS] + sorted(k for k in base if k not in row_labels)
    for key in keys:
        values = [metrics[k].get(key) for k in names]
        if all(_num(v) for v in values) and key not in ("answers", "pairs"):
            lines.append(f"| {row_labels.get(key, key)} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    hits = report.get("hit_max_tokens")
    greedy = hits.get("greedy") if isinstance(hits, dict) else None
    if isinstance(greedy, dict) and "tuned" in greedy:
        lines += ["", ("Greedy answers that hit the token limit without ending their turn: "
                  + ", ".join(f"{labels.get(k, k)} {greedy.get(k)}" for k in names if k in greedy) + ".")]
    return "\n".join(lines + behaviour_lines(report) + benchmark_lines(report))


def behaviour_lines(report: dict[str, Any]) -> list[str]:
    """The judged section of the report (reward judge, safety probe, LLM judge); a malformed one is left out."""
    try:
        section = behaviour_report.markdown(report)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        log.warning("the judged results in report.json are malformed: the card leaves them out")
        return []
    return ["", *[line.replace("## ", "### ", 1) if line.startswith("## ") else
                  line.replace("### ", "#### ", 1) if line.startswith("### ") else line for line in section]]


def benchmark_lines(report: dict[str, Any]) -> list[str]:
    """The standard-benchmark table (`evaluate --tasks`), when the report has one; a malformed one is left out."""
    try:
        table = harness_report.markdown(report, heading="###")
    except (KeyError, TypeError, AttributeError, ValueError):
        log.warning("the harness results in report.json are malformed: the card leaves them out")
        return []
    return ["", *table] if table else []


def limitations_section(base: str, multi_turn: bool = False) -> str:
    scope = ("- The training conversations are in English; other languages were not trained or evaluated."
             if multi_turn else "- The training answers were written for single questions, in English; multi-turn "
             "conversations and other languages were not trained or evaluated.")
    return "\n".join([
        "## Limitations", "",
        ("- The adapter changes tone and style more than knowledge: facts, reasoning and the base model's biases "
        f"are those of `{base}`."),
        scope,
        ("- The evaluation is automatic (likelihoods and a preference between two answers), not a clinical or "
        "human assessment of helpfulness or safety."),
        "- Answers can be confident and wrong, and the model can repeat harmful content present in prompts.",
    ])


def usage_section(kind: str, base: str, extra: str = "") -> str:
    if kind == "adapter":
        code = ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                'model = AutoPeftModelForCausalLM.from_pretrained("REPO_ID", dtype="bfloat16")',
                'tokenizer = AutoTokenizer.from_pretrained("REPO_ID")',
                'messages = [{"role": "user", "content": "I feel overwhelmed at work."}]',
                ("inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',"
                " return_dict=True)"),
                ("out = model.generate(**inputs, max_new_tokens=200)  # generation_config.json stops at "
                "<end_of_turn>"),
                "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))", "```"]
        note = f"The adapter loads on top of `{base}`" + (" (downloaded automatically)." if is_hub_id(base) else ".")
    elif kind == "merged":
        code = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("REPO_ID", dtype="bfloat16")',
                'tokenizer = AutoTokenizer.from_pretrained("REPO_ID")', "```"]
        note = "A standalone model: the adapter is merged into the weights, no PEFT needed."
    else:
        code = ["```sh", "ollama create my-model -f Modelfile && ollama run my-model",
                "# or: llama-cli -m model-q8_0.gguf -cnv", "```"]
        note = "GGUF files for llama.cpp, Ollama and LM Studio."
    return "\n".join(["## How to use", "", note, "", *code] + (["", extra] if extra else []))


def split_sizes(run: RunFiles) -> dict[str, int] | None:
    """Rows per split as the run saved them (splits.json); None for an adapter outside its run."""
    return run.run.split_counts() if run.run else None


def build_body(kind: str, run: RunFiles, title: str, summary: str, dataset: str | None,
               sizes: dict[str, int] | None, extra_sections: list[str] = (), usage_extra: str = "") -> str:
    cfg = run.cfg
    data = run.run.data_record() if run.run else {}
    sections = [f"# {title}", "", summary, "", usage_section(kind, run.base_id, usage_extra), "",
                data_section(cfg, dataset, sizes, data), "", method_section(cfg, run.base_id), "",
                hyperparameter_section(cfg, run), "", evaluation_section(run)]
    for s in extra_sections:
        sections += ["", s]
    sections += ["", limitations_section(run.base_id, bool(data.get("multi_turn"))), "", SAFETY_HEADING, "",
                 SAFETY_NOTE]
    return "\n".join(sections)


def write_card(folder: Path, kind: str, run: RunFiles, summary: str, license: str | None = None,
               dataset: str | None = None, extra_sections: list[str] = (), usage_extra: str = "") -> Path:
    """README.md with the Hub metadata and every section: the one place a release card is written."""
    lic = require_license(run, license)
    ds = dataset_id(run.cfg, dataset)
    sizes = split_sizes(run)
    title = {"adapter": "LoRA adapter", "merged": "Merged model", "gguf": "GGUF"}[kind]
    title = f"{run.base_id.split('/')[-1]} {title}: {run.cfg.run_name}"
    body = build_body(kind, run, title, summary, ds, sizes, extra_sections, usage_extra)
    path = folder / "README.md"
    path.write_text(render_card(metadata(run.cfg, run.base_id, kind, lic, ds), body), encoding="utf-8")
    return path
