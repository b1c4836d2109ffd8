"""A copy of a Hugging Face safetensors model directory with some weights changed, written shard by shard.

:func:`write_edited_model` fills a directory (the temporary one :func:`asft_lightning.fileio.atomic_replace_dir`
hands its ``build``) with the model's plain files (``config.json``, tokenizer, chat template, generation config),
then every safetensors shard under its own name, each tensor passed through ``edit``. The shard layout and the
``model.safetensors.index.json`` stay as they were, so ``from_pretrained`` loads the copy like the original. Peak
memory is one shard plus the tensor being edited; the source directory is only read.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from asft_lightning.checkpoints import CheckpointError, CheckpointReader

__all__ = ["INDEX_NAMES", "WEIGHT_SUFFIXES", "write_edited_model"]

#: Weight files of any format: never copied (the safetensors shards are rewritten; other formats would be stale).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "tf_model.h5.index.json")


def write_edited_model(
    reader: CheckpointReader,
    dest: Path,
    edit: Callable[[str, Tensor], Tensor | None],
    save: Callable[..., None] = save_file,
) -> list[str]:
    """Write the model of ``reader`` into the existing directory ``dest``, with ``edit`` applied to each tensor.

    Args:
        reader: a safetensors checkpoint (not GGUF).
        dest: an empty directory.
        edit: ``edit(key, tensor)`` returns the new tensor (same shape; its dtype is kept as returned) or ``None``
            to keep the tensor as it is.
        save: the safetensors writer (a parameter so tests can make it fail half way).

    Returns:
        The keys ``edit`` changed, in the order written.
    """
    if reader.gguf_file is not None:
        raise CheckpointError(
            f"{reader.path}: a GGUF model cannot be written back; give a safetensors directory"
        )
    src = Path(reader.path)
    shard_names = {f.name for f in reader.files}
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in shard_names or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        if path.name in INDEX_NAMES[1:] or path.name.endswith("_report.json"):
            continue
        shutil.copy2(path, dest / path.name)  # config, tokenizer, generation config, the safetensors index
    changed: list[str] = []
    for shard in reader.files:
        with safe_open(str(shard), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {}
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                new = edit(key, tensor)
                if new is not None:
                    if tuple(new.shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"edit changed the shape of '{key}': {tuple(tensor.shape)} -> {tuple(new.shape)}"
                        )
                    tensor = new
                    changed.append(key)
                tensors[key] = tensor.contiguous()
        meta.setdefault("format", "pt")
        save(tensors, str(dest / shard.name), metadata=meta)
        del tensors
    return changed
