"""The Ollama Modelfile of a GGUF release: which file, the chat template in Ollama's syntax, its stop tokens.

Ollama's templates are Go templates, not Jinja, so the chat formats we know are written out here (Ollama's own
gemma and ChatML templates), and `modelfile_matches` checks that one user turn renders exactly as the Hugging
Face chat template renders it.
"""

from __future__ import annotations

import re
from pathlib import Path

SAMPLE_TURN = "I have been feeling anxious about my exams and I can't sleep. What can I do?"
# Ollama templates for the chat formats we know (Ollama's own gemma / ChatML templates); keyed by turn end.
OLLAMA_TEMPLATES = {
    "<end_of_turn>": (('<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n'
                      '<start_of_turn>model\n{{ .Response }}<end_of_turn>\n'), ["<end_of_turn>", "<start_of_turn>"]),
    "<|im_end|>": (('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n'
                   '{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>\n'),
                   ["<|im_end|>", "<|im_start|>"]),
}


def write_modelfile(out: Path, files: list, turn_end: str, system: str | None = None) -> Path:
    """Ollama Modelfile: FROM the smallest verified quantization, the chat template, and its stop tokens."""
    order = ["q4_k_m", "q4_0", "q5_k_m", "q6_k", "q8_0", "f16"]
    chosen = min(files, key=lambda f: order.index(f.quant) if f.quant in order else len(order))
    template, stops = OLLAMA_TEMPLATES.get(turn_end, (None, [turn_end]))
    lines = [(f"# Ollama: `ollama create NAME -f Modelfile && ollama run NAME`. Other files here: "
             f"{', '.join(f.name for f in files if f is not chosen)}."), f"FROM ./{chosen.name}", ""]
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
        if system:  # the chat template's own default system prompt (SmolLM2's, for one)
            lines += [f'SYSTEM """{system}"""', ""]
    else:
        lines += ["# No Ollama template is known for this chat format: Ollama reads the GGUF's chat template.", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def default_system_prompt(tokenizer) -> str | None:
    """The system message a ChatML template adds by itself when the conversation has none."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    m = re.match(r"^(?:<s>|<\|endoftext\|>)?<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)
    return m.group(1) if m else None


def render_ollama_prompt(modelfile_text: str, user: str) -> str | None:
    """What Ollama sends for one user turn (the template up to the answer), with the Modelfile's SYSTEM."""
    m = re.search(r'TEMPLATE """(.*?)"""', modelfile_text, re.DOTALL)
    if not m:
        return None
    system = re.search(r'^SYSTEM """(.*?)"""', modelfile_text, re.DOTALL | re.MULTILINE)
    if system:
        text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", lambda b: b.group(1), m.group(1),
                      flags=re.DOTALL).replace("{{ .System }}", system.group(1))
    else:
        text = re.sub(r"\{\{ if \.System \}\}.*?\{\{ end \}\}", "", m.group(1), flags=re.DOTALL)
    return text.split("{{ .Response }}")[0].replace("{{ .Prompt }}", user)


def modelfile_matches(modelfile: Path, tokenizer) -> bool | None:
    """Whether Ollama's prompt for one user turn equals the chat template's (None: no TEMPLATE written).
    llama.cpp adds the BOS token itself, so the template's leading BOS is not part of the comparison."""
    user = SAMPLE_TURN
    ollama = render_ollama_prompt(modelfile.read_text(), user)
    if ollama is None:
        return None
    hf = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return hf in (ollama, (tokenizer.bos_token or "") + ollama)
