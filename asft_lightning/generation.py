"""Batched greedy generation: the one way asft-lightning answers prompts (evaluation, the monitor's probe, the world).

:func:`generate` renders nothing itself: it takes prompt texts (tokenised without special tokens) or token ids,
sorts them by length into batches, left-pads them and decodes greedily with the KV cache and a fresh
``GenerationConfig`` (so a checkpoint's sampling defaults do not apply). The result depends only on the prompts
and the settings.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from asft_lightning.errors import ArgumentError, DataError

__all__ = ["END_OF_TURN_TOKENS", "MAX_NEW_TOKENS_LIMIT", "common_prefix_length", "generate", "prefix_cache",
           "stop_token_ids"]

MAX_NEW_TOKENS_LIMIT = 4096
"""Most new tokens a prompt may ask for."""


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
"""End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi): generation also stops at those the
tokenizer knows, even when its ``eos_token`` is another one."""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end a sequence in :func:`generate`: the eos ids of the model's generation config and of the
    tokenizer, then the :data:`END_OF_TURN_TOKENS` that are single tokens of the tokenizer's vocabulary."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in [value] if isinstance(value, int) else list(value):
            if i not in ids:
                ids.append(int(i))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in END_OF_TURN_TOKENS:
        i = vocab.get(token)
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are not worth a separate forward pass."""


def common_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence, leaving at least one token of each outside it."""
    if not ids:
        return 0
    limit = min(len(x) for x in ids) - 1
    first = ids[0]
    n = 0
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return n


def prefix_cache(model: Any, prefix: Sequence[int], device: torch.device) -> Any | None:
    """The KV cache of ``prefix`` (batch 1), or ``None`` when the model's cache cannot be copied and expanded."""
    out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return cache


def expanded_cache(cache: Any, batch: int) -> Any:
    """A fresh copy of a batch-1 ``cache`` repeated ``batch`` times (the original is left untouched)."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch)
    return copied


@torch.no_grad()
def _greedy_dropping_finished(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past: Any,
    skip: int,
    max_new_tokens: int,
    stop: Sequence[int],
) -> list[list[int]]:
    """Greedy decoding that removes each sequence from the batch (and its rows from the KV cache) once it has
    produced a stop token, so finished answers cost nothing while the others go on.

    ``input_ids`` / ``attention_mask``: the batch as :func:`generate` lays it out; ``past``: the cache of its first
    ``skip`` positions (the shared prefix) or ``None``. Returns the new tokens of each row, stop token included.
    """
    device = input_ids.device
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids[:, skip:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, skip:],
        past_key_values=past,
        use_cache=True,
        logits_to_keep=1,
    )
    past = out.past_key_values
    stop_ids = torch.tensor(list(stop), device=device, dtype=torch.long)
    alive = torch.arange(input_ids.shape[0], device=device)
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    mask = attention_mask
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1)
        for row, tok in zip(alive.tolist(), nxt.tolist(), strict=True):
            tokens[row].append(tok)
        if step == max_new_tokens - 1:
            break
        keep = ~torch.isin(nxt, stop_ids) if len(stop_ids) else torch.ones_like(nxt, dtype=torch.bool)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            index = keep.nonzero().squeeze(1)
            past.batch_select_indices(index)
            alive, nxt, mask = alive[index], nxt[index], mask[index]
        positions = mask.sum(-1, keepdim=True)  # the new token's position: the number of real tokens before it
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, past_key_values=past,
                    use_cache=True)
    return tokens


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    desc: str = "generating",
    share_prefix: bool = False,
    drop_finished: bool = False,
) -> list[str]:
    """Batched greedy generation; returns the decoded completions only (prompt tokens stripped), in input order.

    Prompts are sorted by length (stable, longest first) into batches to cut padding, left-padded with the pad
    token (eos when the tokenizer has none) and decoded with the KV cache and ``do_sample=False``; a sequence stops
    at any id of :func:`stop_token_ids` (eos of the model's generation config or the tokenizer, end-of-turn tokens),
    and a batch as soon as all its sequences have stopped. The result depends only on the prompts and the
    settings, so two runs give the same completions.

    With ``share_prefix`` the token prefix common to every prompt (a chat template's system line, a task's fixed
    instruction) is run once and its KV cache copied into each batch: each row is then ``prefix + padding +
    rest`` (the padding moves from the left edge to just after the prefix, masked as before, positions counted
    from the attention mask), which gives the same completions as without it, up to floating-point round-off,
    at a fraction of the prompt cost when the prefix is long. Prefixes under 8 tokens are not shared.

    With ``drop_finished`` the decoding loop is this module's own (greedy, the same argmax as ``model.generate``)
    and a sequence leaves the batch, its KV-cache rows with it, as soon as it has stopped: a batch of mostly short
    answers (refusals) then costs what its answers need, not ``batch_size`` times the longest one.

    Args:
        model: a Hugging Face causal LM (or a PEFT model around one).
        tokenizer: its tokenizer.
        prompts: rendered prompt texts (tokenised without special tokens) or lists of token ids.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: most tokens generated per prompt.
        progress: show a progress bar on stderr.
        desc: the progress bar's label.
        share_prefix: compute the prompts' common token prefix once (see above).
        drop_finished: drop finished sequences from the batch while the others go on (see above).
    """
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ArgumentError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens}")
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    ids = [
        tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
        for p in prompts
    ]
    for i, row in enumerate(ids):
        if not row:
            raise DataError(f"prompt {i} is empty after tokenisation")
    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise ArgumentError("the tokenizer has neither a pad nor an eos token; cannot left-pad a batch")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max((len(r) for r in ids), default=0)
    if limit and longest + max_new_tokens > limit:
        warnings.warn(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position_embeddings={limit}",
            stacklevel=2,
        )
    device = next(model.parameters()).device
    shared = common_prefix_length(ids) if share_prefix else 0
    cache = prefix_cache(model, ids[0][:shared], device) if shared >= MIN_SHARED_PREFIX else None
    if cache is None:
        shared = 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str | None] = [None] * len(ids)
    with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):
                rest = ids[i][shared:]  # shared == 0: plain left padding
                input_ids[j, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
                attention_mask[j, width - len(rest) :] = 1
            if shared:
                input_ids[:, :shared] = torch.tensor(ids[chunk[0]][:shared], dtype=torch.long)
                attention_mask[:, :shared] = 1
            past = expanded_cache(cache, len(chunk)) if shared else None
            if drop_finished:
                new = _greedy_dropping_finished(
                    model, input_ids.to(device), attention_mask.to(device), past, shared, max_new_tokens, eos
                )
            else:
                result = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    **({"past_key_values": past} if shared else {}),
                )
                new = [result[j, width:].tolist() for j in range(len(chunk))]
            for j, i in enumerate(chunk):
                out[i] = tokenizer.decode(new[j], skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return [o if o is not None else "" for o in out]
