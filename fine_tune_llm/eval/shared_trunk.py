"""The blocks below the lowest adapted one, run once for every column of an evaluation.

The columns of a report are one base model with different adapters switched on (eval/evaluate.Columns). Below the
lowest block any adapter touches (`lora_layers`: the smollm2-135m preset adapts the top 15 of 30), every column
computes the same hidden states from the same tokens. So the first column's scoring keeps them as they enter the
lowest adapted block, and each later column, making the same forward calls in the same order, starts there: the
same tensors go on, so the numbers are the same, and those blocks cost once instead of once per column.
"""

from __future__ import annotations

import contextlib

import torch

# Hidden states kept for the later columns, at most; the forwards past it run whole. The preset's 250 test pairs
# keep ~80 MB (576 wide, float32); a 2,048-wide model on a few thousand rows stays under this.
KEEP_BYTES = 2 * 1024**3


class SharedTrunk:
    """`record()` around the first column's scoring, `replay()` around each later column's, which must make the
    same forward calls (checked: a call whose token ids differ from the recorded one raises). A model whose lowest
    block is adapted, or whose embedding is, shares nothing and runs as before."""

    def __init__(self, model, keep_bytes: int = KEEP_BYTES):
        self.embedding = model.get_input_embeddings()
        self.layers, self.first = trunk_layers(model)
        self.keep_bytes = keep_bytes
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (token ids, hidden states entering block first)
        self.kept_bytes = 0
        self.calls = 0  # forward calls seen in this record or replay
        self.ids: torch.Tensor | None = None  # record: the current call's token ids
        self.hidden: torch.Tensor | None = None  # replay: the current call's kept hidden states, if any

    @property
    def shares(self) -> bool:
        return self.first > 0

    def record(self):
        return self._hooked(replay=False)

    def replay(self):
        return self._hooked(replay=True)

    @contextlib.contextmanager
    def _hooked(self, replay: bool):
        if not self.shares:
            yield self
            return
        self.calls, self.ids, self.hidden = 0, None, None
        handles = [self.embedding.register_forward_pre_hook(self._replay_tokens if replay else self._record_tokens),
                   self.layers[self.first].register_forward_pre_hook(
                       self._enter_from_kept if replay else self._keep_entering, with_kwargs=True)]
        if replay:
            for layer in self.layers[:self.first]:
                layer.forward = self._skipping(layer.forward)  # an instance attribute: the class's stays as it is
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers[:self.first]:
                layer.__dict__.pop("forward", None)
            self.ids = self.hidden = None

    def _record_tokens(self, _module, args):
        self.calls += 1
        self.ids = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _keep_entering(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        size = hidden.numel() * hidden.element_size()
        # Kept only while every earlier call was: kept[n] is always call n + 1's.
        if self.ids is not None and len(self.kept) == self.calls - 1 and self.kept_bytes + size <= self.keep_bytes:
            self.kept.append((self.ids, hidden))
            self.kept_bytes += size
        self.ids = None

    def _replay_tokens(self, _module, args):
        self.calls += 1
        if self.calls > len(self.kept):
            self.hidden = None
            return
        ids, self.hidden = self.kept[self.calls - 1]
        if not (isinstance(args[0], torch.Tensor) and torch.equal(args[0], ids)):
            raise RuntimeError(f"forward call {self.calls} of a later column differs from the first column's: "
                               "a shared trunk needs the same calls in the same order")

    def _skipping(self, forward):
        def forward_or_skip(hidden_states, *args, **kwargs):
            return hidden_states if self.hidden is not None else forward(hidden_states, *args, **kwargs)
        return forward_or_skip

    def _enter_from_kept(self, _module, args, kwargs):
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def trunk_layers(model) -> tuple[torch.nn.ModuleList | None, int]:
    """(the model's list of transformer blocks, the index of the lowest one an adapter touches): 0 when the first
    block is adapted, when something before the blocks is (an adapted or retrained embedding), or when the blocks
    are not found."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    layers = next((m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.ModuleList) and name.endswith("layers") and len(m) == n), None)
    if layers is None:
        return None, 0
    adapted = [i for i, layer in enumerate(layers)
               if any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in layer.modules())]
    in_layers = {id(m) for m in layers.modules()}
    outside = [name for name, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
               and id(m) not in in_layers and not name.endswith("lm_head")]
    if outside or not adapted:
        return layers, 0
    return layers, adapted[0]
