"""What the notebooks show: the masked view of a training example (multi-turn ones too), answer tables, a model
summary.

Every helper returns something that renders both in a notebook (HTML) and as plain text (a terminal, a
headless run, a diff of executed notebooks), so the lesson reads the same everywhere.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

# Inline styles only: VS Code and GitHub strip <style> blocks from notebook outputs.
PROMPT_STYLE = "color:#888;opacity:0.55"
TRAINED_STYLE = "background:#d4f7d4;color:#063;border-bottom:1px solid #2a2"
BOX_STYLE = "font-family:monospace;white-space:pre-wrap;line-height:1.6;border:1px solid #ddd;padding:6px"


class Rich:
    """An output with an HTML and a plain-text form; IPython picks the best one its frontend can show."""

    def __init__(self, html_text: str, text: str):
        self.html, self.text = html_text, text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def token_pieces(tokenizer, input_ids: list[int]) -> list[str]:
    """The text each token adds, special tokens included; the pieces join to the full decoded text.

    Decoding tokens one by one breaks on byte-fallback characters (an emoji is several byte tokens) and
    on tokenizers that drop a leading space, so each piece is the growth of the decoded prefix instead.
    """
    pieces, shown = [], ""
    for i, token in enumerate(input_ids):
        text = tokenizer.decode(input_ids[: i + 1], skip_special_tokens=False)
        # A multi-byte character decodes to U+FFFD until its last byte arrives: wait for it.
        stable = text.rstrip("\ufffd") if i + 1 < len(input_ids) else text
        if stable.startswith(shown):
            pieces.append(stable[len(shown):])
            shown = stable
        else:  # the decoder rewrote earlier text (rare): fall back to this token alone
            pieces.append(tokenizer.decode([token], skip_special_tokens=False))
            shown = text
    return pieces


def masked_view(tokenizer, input_ids: list[int], completion_mask: list[int]) -> Rich:
    """One tokenized example with the loss mask made visible.

    HTML: prompt tokens dimmed, trained tokens highlighted (hover a token for its id). Plain text: trained
    spans wrapped in [[ ]], so `<end_of_turn>` visibly sits inside the trained span and the prompt outside.
    """
    ids, mask = list(input_ids), [int(m) for m in completion_mask]
    if len(ids) != len(mask):
        raise ValueError(f"input_ids has {len(ids)} tokens but completion_mask has {len(mask)}")
    pieces = token_pieces(tokenizer, ids)
    n_trained = sum(mask)
    legend = (f"{len(ids) - n_trained} prompt tokens (dimmed: no loss) · "
              f"{n_trained} trained tokens (highlighted: the loss is computed on these)")
    spans, text, prev = [], [], 0
    for token, piece, m in zip(ids, pieces, mask):
        style = TRAINED_STYLE if m else PROMPT_STYLE
        shown = html.escape(piece).replace("\n", "↵\n")
        spans.append(f'<span style="{style}" title="id {token}{" · trained" if m else ""}">{shown}</span>')
        text.append(("[[" if m and not prev else "]]" if prev and not m else "") + piece)
        prev = m
    plain = "".join(text) + ("]]" if prev else "")
    return Rich(f'<div style="font-size:90%">{html.escape(legend)}</div>'
                f'<div style="{BOX_STYLE}">{"".join(spans)}</div>', f"{legend}\n{plain}")


def trained_tokens(tokenizer, data, row: int | None = None, split: str = "train") -> Rich:
    """The masked view of one training row of prepare_data's result: a multi-turn one when the data has one (each
    assistant turn and its end-of-turn highlighted, system and user turns and role headers dimmed), else the first;
    `row` picks a row by its 1-based number in the data file."""
    from ..data.tokenized import pick_example

    ds = data.tokenized[split]
    example = ds[pick_example(ds, row)]
    return masked_view(tokenizer, example["input_ids"], example["completion_mask"])


def conversation_text(tokenizer, question: str, answer: str, system_prompt: str | None = None) -> str:
    """A question and its answer rendered through the model's chat template, as the model reads them."""
    from ..data.chat_template import prepare_turns, with_system

    conv = with_system([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                       system_prompt)
    return tokenizer.apply_chat_template(prepare_turns(tokenizer, conv), tokenize=False)


def table(df) -> Rich:
    """A DataFrame with long text wrapped and left-aligned (answers are paragraphs, not numbers)."""
    import pandas as pd

    styler = df.style.set_properties(**{"text-align": "left", "white-space": "pre-wrap", "vertical-align": "top"})
    styler = styler.set_table_styles([{"selector": "th", "props": [("text-align", "left")]}])
    styler = styler.format(precision=3)
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        return Rich(styler.to_html(), df.to_string())


def split_counts(splits: dict[str, list[dict[str, Any]]], tokenized: dict[str, Any] | None = None):
    """Rows and distinct prompts (group keys: a question, or a conversation's user turns) per split, and how many
    rows survived tokenization."""
    import pandas as pd

    from ..data.rows import group_key

    rows = []
    for name, examples in splits.items():
        row = {"split": name, "rows": len(examples), "prompts": len({group_key(e) for e in examples})}
        if tokenized is not None:
            ds = tokenized[name]
            row["tokenized rows"] = len(ds)
            row["answer tokens"] = sum(map(sum, ds["completion_mask"])) if len(ds) else 0
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def answers_frame(results: list[dict[str, Any]]):
    """generate_answers' output as a table, with the time per generated token of each answer."""
    import pandas as pd

    df = pd.DataFrame(results)
    df["ms / token"] = 1000 * df["seconds"] / df["new_tokens"].clip(lower=1)
    return df.rename(columns={"new_tokens": "new tokens", "hit_max_tokens": "hit max tokens"})


def timing(results: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput over a set of answers. Each answer's `seconds` is its share of its batch's wall time, so
    the sum is the wall time, and one-by-one and batched runs compare directly."""
    tokens = sum(r["new_tokens"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    return {"answers": len(results), "new tokens": tokens, "seconds": round(seconds, 3),
            "ms / token": round(1000 * seconds / max(tokens, 1), 2),
            "tokens / s": round(tokens / seconds, 1) if seconds else float("nan")}


def side_by_side(questions: list[str], **answers: list[Any]):
    """Question, then one column per model (base=..., tuned=..., reference=...); items are str or result dicts."""
    import pandas as pd

    columns: dict[str, list[str]] = {"question": list(questions)}
    for name, items in answers.items():
        if len(items) != len(questions):
            raise ValueError(f"{name}: {len(items)} answers for {len(questions)} questions")
        columns[name] = [a["answer"] if isinstance(a, dict) else a for a in items]
    return pd.DataFrame(columns)


def _quantization(model) -> str:
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None:
        dtype = getattr(model, "dtype", None)
        return f"none ({str(dtype).replace('torch.', '')})"
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    if q.get("load_in_4bit"):
        double = ", double quantization" if q.get("bnb_4bit_use_double_quant") else ""
        compute = str(q.get("bnb_4bit_compute_dtype", "")).replace("torch.", "")
        return f"4-bit {q.get('bnb_4bit_quant_type', '').upper()}{double}, compute in {compute}"
    if q.get("load_in_8bit"):
        return "8-bit (LLM.int8)"
    return str(q.get("quant_method", q))


def model_summary(model):
    """Base model, quantization, LoRA settings, trainable parameters and memory footprint, as a table."""
    import pandas as pd

    from ..model.loading import memory_footprint_mb, parameter_counts

    trainable, total = parameter_counts(model)
    info: dict[str, Any] = {
        "base model": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "?"),
        "quantization": _quantization(model),
    }
    peft = getattr(model, "peft_config", {}).get("default")
    if peft is not None:
        info["LoRA"] = (f"r={peft.r}, alpha={peft.lora_alpha} (scale {peft.lora_alpha / peft.r:g}), "
                        f"dropout={peft.lora_dropout}")
        info["LoRA target modules"] = ", ".join(sorted(peft.target_modules))
        info["trainable parameters"] = f"{trainable:,} ({100 * trainable / max(total, 1):.3f}% of {total:,})"
    else:  # nothing is trained without adapters (a fresh load still flags embeddings trainable: ignore that)
        info["LoRA"] = "none"
        info["parameters"] = f"{total:,}"
    info["memory footprint"] = f"{memory_footprint_mb(model):,.1f} MB"
    return pd.DataFrame({"value": info})


def files_table(folder: str | Path):
    """The files in a folder (an adapter, a run directory) with their sizes."""
    import pandas as pd

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return pd.DataFrame({"file": [str(p.relative_to(folder)) for p in files],
                         "size (KB)": [round(p.stat().st_size / 1024, 1) for p in files]})


def recipe(cfg):
    """What a run will do, as the preset and any knob set in the notebook made it: the values to check before
    training (a learning rate or an adapter size meant for another model is the usual surprise)."""
    import pandas as pd

    length = f"{cfg.max_steps} optimizer steps" if cfg.max_steps > 0 else f"{cfg.num_epochs:g} epoch(s)"
    rows = f" (first {cfg.data_samples} rows)" if cfg.data_samples else ""
    info = {"preset": cfg.preset, "base model": cfg.base_model, "data": f"{cfg.dataset}{rows}",
            "quantization": cfg.quantization, "LoRA": f"r={cfg.lora_r}, alpha={cfg.lora_alpha}",
            "learning rate": f"{cfg.learning_rate:g}", "length": length,
            "batch": f"{cfg.batch_size} rows x {cfg.grad_accum} accumulated", "run directory": cfg.output_dir}
    return pd.DataFrame({"value": info})


def training_summary(result):
    """Steps, first and last training loss, last eval loss (None when no evaluation ran), where the adapter is."""
    import pandas as pd

    losses = [h["loss"] for h in result.log_history if "loss" in h]
    info = {"optimizer steps": result.global_step, "first train loss": losses[0] if losses else None,
            "final train loss": result.train_loss, "final eval loss": result.eval_loss,
            "interrupted": result.interrupted, "adapter": str(result.adapter_dir)}
    return pd.DataFrame({"value": info})
