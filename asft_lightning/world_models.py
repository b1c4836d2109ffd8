"""The world's model steps: GGUF conversion, loading, answer generation and the full-parameter alignment fine-tune.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ['answer', 'auto_threads', 'convert_gguf', 'finetune', 'length_grouped_batches', 'load_model']


def auto_threads() -> int:
    """Torch threads for the heavy stages: the cores not already busy (load average), at least 1, at most 2."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(2, cores, int(cores - busy + 0.5)))


def convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantise the GGUF model to fp32 and save it (and its tokenizer) as a Hugging Face safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_lightning.fileio import atomic_replace_dir

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf ... not serializable"): rebuild it plain.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"{gguf}: state dict mismatch after conversion (missing {missing}, unexpected {unexpected})")
    model.generation_config = loaded.generation_config
    del loaded

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_replace_dir(build, out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32"}


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), tokenizer


def answer(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int, progress: bool, desc: str
) -> list[tuple[str, bool]]:
    """Greedy answers ``(text, finished)`` with the prompts rendered by the chat template (as in training/eval)."""
    from asft_lightning.data import render_prompt
    from asft_lightning.generation import generate

    rendered = [render_prompt(tokenizer, p) for p in prompts]
    texts = generate(model, tokenizer, rendered, batch_size, max_new_tokens, progress, desc)
    # an answer that used (nearly) all its tokens was cut: it must not be taught with an end token
    return [(t, len(tokenizer(t, add_special_tokens=False)["input_ids"]) < max_new_tokens - 1) for t in texts]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length within windows of 8 batches (less padding), shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Full-parameter SFT (AdamW, linear warm-up then linear decay, grad-norm clip 1), loss on responses only.

    The output layer is applied to the supervised positions only (the same loss, less work). Rows are
    ``{"prompt", "response", "finished"}``; an unfinished (cut) response gets no end token.
    """
    import torch
    import torch.nn.functional as F

    from asft_lightning.data import IGNORE_INDEX, collate, encode_example

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for r in rows:
        ex = encode_example(tokenizer, r["prompt"], r["response"], max_length=max_length)
        if not r.get("finished", True) and not ex["truncated"]:
            ex["input_ids"], ex["labels"] = ex["input_ids"][:-1], ex["labels"][:-1]
        encoded.append(ex)
    lengths = [len(e["input_ids"]) for e in encoded]
    torch.manual_seed(seed)
    rng = random.Random(f"align-{seed}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(10, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    model.train()
    losses: list[float] = []
    batches: list[list[int]] = []
    start = time.perf_counter()
    for step in range(steps):
        if not batches:
            batches = length_grouped_batches(lengths, batch_size, rng)
        batch = collate([encoded[i] for i in batches.pop()], pad)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        logits = head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), labels[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log(
                f"  align step {step + 1}/{steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"({elapsed / (step + 1):.1f} s/step)"
            )
    model.eval()
    return {
        "steps": steps,
        "examples": len(encoded),
        "epochs": round(steps * batch_size / max(1, len(encoded)), 3),
        "loss_first10": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
        "loss_last10": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "seconds_per_step": round((time.perf_counter() - start) / max(1, steps), 2),
    }
