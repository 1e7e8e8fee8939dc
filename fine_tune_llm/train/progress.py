"""The training console: one progress bar, and one compact line per logging step instead of the Trainer's dicts.

transformers' ProgressCallback writes each log as a raw dict (`{'loss': '7.195', 'grad_norm': '0.4414', ...}`)
between bar redraws, plus a second bar per evaluation. Here a logging step prints

    step   10/30  loss 6.560  lr 2.38e-03  grad 0.79  3,120 tok/s
    step   10/30  eval loss 6.470

and the bar reads as plain lines in a log file (console.progress). In a notebook the Trainer's own table stays.
"""

from __future__ import annotations

import time

from transformers import ProgressCallback, TrainerCallback

from .. import console

# The preference stage's two numbers worth watching, as TRL logs them.
PREFERENCE_LOGS = {"rewards/margins": "margin", "rewards/accuracies": "accuracy"}


def format_log(step: int, max_steps: int, logs: dict, tokens_per_second: float | None) -> str | None:
    """One line for a Trainer log entry; None for the end-of-training totals (the summary prints those)."""
    head = f"step {step:>{len(str(max_steps))}}/{max_steps}"
    if "eval_loss" in logs:
        return f"{head}  eval loss {logs['eval_loss']:.4f}"
    if "loss" not in logs:
        return None
    parts = [head, f"loss {logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if logs.get("grad_norm") is not None:
        parts.append(f"grad {logs['grad_norm']:.2f}")
    for key, name in PREFERENCE_LOGS.items():
        if key in logs:
            parts.append(f"{name} {logs[key]:.3f}")
    if tokens_per_second:
        parts.append(f"{tokens_per_second:,.0f} tok/s")
    return "  ".join(parts)


class CompactProgress(TrainerCallback):
    def __init__(self):
        self.bar = None
        self.last = (0.0, 0.0)  # (time, tokens seen) at the previous training log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = console.progress(total=state.max_steps, initial=state.global_step, desc="training",
                                        unit="step")
            self.last = (time.monotonic(), float(state.num_input_tokens_seen or 0))

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        rate = None
        tokens = logs.get("num_tokens")
        if "loss" in logs and tokens is not None:
            now, (then, seen) = time.monotonic(), self.last
            rate = (float(tokens) - seen) / (now - then) if now > then and float(tokens) > seen else None
            self.last = (now, float(tokens))
        line = format_log(state.global_step, state.max_steps, logs, rate)
        if line:
            self.bar.write(line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_compact_progress(trainer) -> None:
    """Swap the Trainer's terminal progress callback for ours (the notebook one, a table, is kept)."""
    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(CompactProgress())


__all__ = ["CompactProgress", "format_log", "use_compact_progress"]
