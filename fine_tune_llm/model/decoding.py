"""Decoding a left-padded batch of mixed-adapter rows with a KV cache: model.generate's greedy answers, for less.

Two savings over generate. A prompt asked of one adapter twice (its greedy and its sampled answer) is prefilled
once, its cache copied to both rows. A row that has ended leaves the batch: the cache, mask and positions of the
rows still decoding are all the next step computes (generate computes every row until the longest answer ends).
A token is the argmax of the row's float32 logits, or the row's own draw (RowSampler), as through generate.
Settings that ask generate for more (a repetition penalty, a minimum length, beam search...) are not done here:
`generate_only` names them, and the caller leaves such a config to generate.
"""

from __future__ import annotations

import torch

# Settings whose value, other than the one shown (or None), makes generate process the logits, stop or search in a
# way decode does not: transformers' _get_logits_processor, _get_stopping_criteria and its decoding modes.
_NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "bad_words_ids": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "guidance_scale": 1.0, "watermarking_config": None, "max_time": None,
    "stop_strings": None, "num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "dola_layers": None,
    "prompt_lookup_num_tokens": None,
}


def generate_only(gen) -> list[str]:
    """The settings of generation config `gen` that decode does not apply (empty: decode answers as generate)."""
    return [name for name, neutral in _NEUTRAL.items() if getattr(gen, name, None) not in (None, neutral)]


class RowSampler:
    """Samples each row with its own generator (rows without one stay greedy). The warpers are those generate
    itself applies when sampling (temperature, top-k, top-p, from the model's generation config), in its order.

    As generate's logits processor it hands a sampled row a one-hot score, so greedy decoding keeps the pick;
    decode asks it for the picks directly and drops the generators of rows that have ended."""

    def __init__(self, warpers: list, seeds: list[int | None], device: torch.device):
        self.warpers = warpers
        self.generators = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, generator in enumerate(self.generators):
            if generator is not None:
                out[row] = float("-inf")
                out[row, self._draw(scores[row:row + 1], generator)] = 0.0
        return out

    def pick(self, scores: torch.FloatTensor) -> torch.LongTensor:
        """Each row's next token: its draw where it samples, the argmax of its scores where it does not."""
        picks = scores.argmax(dim=-1)
        for row, generator in enumerate(self.generators):
            if generator is not None:
                picks[row] = self._draw(scores[row:row + 1], generator)
        return picks

    def keep(self, rows: list[int]) -> None:
        """Keep the generators of `rows` only, in that order (the other rows have ended)."""
        self.generators = [self.generators[r] for r in rows]

    def _draw(self, scores: torch.FloatTensor, generator: torch.Generator) -> int:
        # The warpers _generation_settings builds (temperature, top-k, top-p) read the scores only, not the ids.
        for warper in self.warpers:
            scores = warper(None, scores)
        return int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1, generator=generator))


class LiveRows:
    """The rows still decoding: their place in the batch, attention mask, next position and adapter, with the KV
    cache and the sampler, which all lose a row together when it ends."""

    def __init__(self, mask: torch.Tensor, positions: torch.Tensor, adapters: list[str] | None, cache, sampler):
        self.index = list(range(len(mask)))
        self.mask, self.positions, self.adapters = mask, positions, adapters
        self.cache, self.sampler = cache, sampler

    def keep(self, rows: list[int]) -> None:
        """Drop every row but `rows` (indices among the live rows)."""
        picked = torch.tensor(rows, device=self.mask.device)
        self.index = [self.index[r] for r in rows]
        self.mask, self.positions = self.mask[picked], self.positions[picked]
        self.adapters = None if self.adapters is None else [self.adapters[r] for r in rows]
        self.cache.batch_select_indices(picked)
        self.sampler.keep(rows)

    def step(self, model, tokens: torch.LongTensor) -> torch.FloatTensor:
        """Run each live row's new token through the model: the float32 logits of its next one."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=-1)
        self.positions = self.positions + 1  # generate's: one past the row's last position
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions, cache=self.cache,
                    use_cache=True, **adapter_args(self.adapters))
        return out.logits[:, -1].float()


@torch.inference_mode()
def decode(model, enc, adapters: list[str] | None, sampler: RowSampler, gen) -> list[list[int]]:
    """Each row's new tokens, up to and including the stop token that ended it (gen.eos_token_id), at most
    gen.max_new_tokens: model.generate's tokens without the padding after them.

    enc: the left-padded batch (input_ids, attention_mask); adapters: each row's peft adapter (None: a model
    without adapters); sampler: picks each row's token (RowSampler)."""
    stop_ids = torch.tensor(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    live, logits = _prefill(model, enc["input_ids"], enc["attention_mask"], adapters, sampler)
    tokens: list[list[int]] = [[] for _ in live.index]
    for step in range(gen.max_new_tokens):
        picks = sampler.pick(logits)
        for row, token in zip(live.index, picks.tolist()):
            tokens[row].append(token)
        going = (~torch.isin(picks, stop_ids.to(picks.device))).nonzero().squeeze(1).tolist()
        if not going or step + 1 == gen.max_new_tokens:
            break
        if len(going) < len(live.index):
            live.keep(going)
            picks = picks[going]
        logits = live.step(model, picks)
    return tokens


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor, adapters: list[str] | None, sampler: RowSampler):
    """Run each distinct (prompt, adapter) once, then copy its cache and last logits to every row that asks it:
    the live rows and the float32 logits of their first new token."""
    firsts, of_row = _distinct_rows(ids, adapters)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # generate's, for left-padded rows
    named = None if adapters is None else [adapters[r] for r in firsts]
    out = model(input_ids=ids[firsts], attention_mask=mask[firsts], position_ids=positions[firsts], use_cache=True,
                logits_to_keep=1, **adapter_args(named))
    rows = torch.tensor(of_row, device=ids.device)
    out.cache.batch_select_indices(rows)  # advanced indexing: a repeated row is a copy
    live = LiveRows(mask, positions[:, -1:], adapters, out.cache, sampler)
    return live, out.logits[rows, -1].float()


def _distinct_rows(ids: torch.Tensor, adapters: list[str] | None) -> tuple[list[int], list[int]]:
    """The first row of each distinct (prompt, adapter), and for every row the index of its own among those."""
    firsts: list[int] = []
    seen: dict[tuple, int] = {}
    of_row = []
    for row, key in enumerate(zip(map(tuple, ids.tolist()), adapters or [None] * len(ids))):
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(row)
        of_row.append(seen[key])
    return firsts, of_row


def kv_bytes_per_token(model) -> int:
    """The KV cache one token of one row holds: keys and values of every layer, in the compute dtype (float32 where
    the weights are quantized)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(model, "dtype", torch.float32)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * (dtype.itemsize if dtype.is_floating_point else 4)


def adapter_args(adapters: list[str] | None) -> dict:
    """The model's keyword for each row's adapter: none for a model without adapters."""
    # Named on every row, base rows too: without adapter_names a peft model runs its active adapter.
    return {} if adapters is None else {"adapter_names": adapters}
