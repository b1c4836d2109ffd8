"""The world's cache folder: its manifest (``world.json``), stages run once per settings key, JSONL and digests.

A stage's outputs are recorded with their SHA-256 and checked on every later run, so a file edited, truncated or
replaced since it was built is rebuilt, never used silently.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from asft_lightning.fileio import atomic_write_text, sha256_file

__all__ = ['FORMAT_VERSION', 'MANIFEST', 'WorldCache', 'digest', 'output_digest', 'read_jsonl', 'texts_digest', 'write_jsonl']


MANIFEST = "world.json"
FORMAT_VERSION = 1


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def output_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder as the digest over its files' relative paths and SHA-256s."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(x for x in path.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


class WorldCache:
    """The cache folder and its manifest; runs each stage once per settings key, saving the manifest after each."""

    def __init__(self, root: Path, force: bool, log: Callable[[str], None]) -> None:
        self.root = root
        self.force = force
        self.log = log
        path = root / MANIFEST
        try:
            self.manifest = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            self.manifest = {}
        if self.manifest.get("format_version") != FORMAT_VERSION:
            self.manifest = {"format_version": FORMAT_VERSION}
        self.manifest.setdefault("stages", {})
        self.forced: set[str] = set()

    def save(self) -> None:
        atomic_write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n", self.root / MANIFEST)

    def valid(self, name: str, key: str) -> bool:
        """The stage ran with these settings and every output is still there with the content it was built with.

        Outputs are compared by SHA-256 (a folder: over its files' paths and digests), so an edited, truncated or
        replaced file is rebuilt, never used. A record written before digests were kept (sizes only) is checked by
        size and then gets its digests.
        """
        rec = self.manifest["stages"].get(name)
        if self.force and name not in self.forced:
            return False
        if not rec or rec.get("key") != key:
            return False
        for rel, size in rec.get("outputs", {}).items():
            p = self.root / rel
            if not p.exists() or (p.is_file() and size is not None and p.stat().st_size != size):
                self.log(f"[{name}] {p} is missing or changed size since it was built: rebuilding")
                return False
        digests = rec.get("output_sha256")
        if digests is None:
            rec["output_sha256"] = {rel: output_digest(self.root / rel) for rel in rec.get("outputs", {})}
            self.save()
            return True
        for rel, digest in digests.items():
            if output_digest(self.root / rel) != digest:
                self.log(f"[{name}] {self.root / rel} changed since it was built (SHA-256 differs): rebuilding")
                return False
        return True

    def run(self, name: str, settings: dict[str, Any], outputs: Sequence[str], build: Callable[[], dict]) -> dict:
        key = digest(settings)
        if self.valid(name, key):
            rec = self.manifest["stages"][name]
            self.log(f"[{name}] cached ({rec.get('seconds', 0):.0f} s when built)")
            return rec
        self.log(f"[{name}] building ...")
        start = time.perf_counter()
        info = build() or {}
        seconds = round(time.perf_counter() - start, 1)
        out_sizes = {}
        for rel in outputs:
            p = self.root / rel
            if not p.exists():
                raise RuntimeError(f"stage {name}: expected output {p} was not written")
            out_sizes[rel] = p.stat().st_size if p.is_file() else None
        rec = {"key": key, "settings": settings, "seconds": seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "outputs": out_sizes, "output_sha256": {rel: output_digest(self.root / rel) for rel in outputs},
               **info}
        self.manifest["stages"][name] = rec
        self.forced.add(name)
        self.save()
        self.log(f"[{name}] done in {seconds:.0f} s")
        return rec
