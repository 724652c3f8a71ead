"""Cached sparse teacher: the teacher's top-k next-token log-probabilities per scored token, written once and reused.

A stage with `kd_topk: K` and `teacher_cache: DIR` trains against the teacher's top-K probabilities plus its tail mass
(`losses.topk_kl`: what that KL is, and how far it is from the full one). The first run computes them from the
teacher's forward and stores them; any later run whose teacher, data, packing and settings are the same (another
ablation variant of the stage, a rerun, a resumed run) reads them instead of running the teacher at all.

Layout: DIR/<key>/manifest.json (the fingerprint in full) and one safetensors file per (step, micro-batch):
`ids` [n, K] int32 and `logp` [n, K] float32 for the n scored tokens of that micro-batch, in order. Size: 8 K bytes
per scored token (K = 64: 512 bytes; 4 GB per 8M scored tokens). The key is a hash of the fingerprint, which holds
every input of those numbers: the teacher's weights (sha256) and precision, the corpus files (sha256), the packed
stream (seq_len, shuffle seed, loss mask), the step's shape (batch and micro-batch size: micro-batch j of step s is
fixed by them) and K, temperature. A file carries the key in its metadata and is checked on every read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from gendistill.distill.losses import TopK
from gendistill.io import UserError, atomic_write_bytes, atomic_write_json, sha256_file


def corpus_sha256(corpus) -> str:
    """sha256 over a TokenCorpus' arrays (tokens, assistant flags, document offsets): what the packed stream reads."""
    h = hashlib.sha256()
    for name in ("tokens.npy", "assistant.npy", "offsets.npy"):
        h.update(sha256_file(Path(corpus.directory) / name).encode())
    return h.hexdigest()


class TopKCache:
    """Read/write access to one fingerprint's directory of cached top-k teacher distributions."""

    def __init__(self, root: str | Path, fingerprint: dict, write_manifest: bool = True):
        self.fingerprint = fingerprint
        self.key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.directory = Path(root).expanduser() / self.key
        self.k = int(fingerprint["kd_topk"])
        manifest = self.directory / "manifest.json"
        if manifest.exists():
            recorded = json.loads(manifest.read_text())
            if recorded != json.loads(json.dumps(fingerprint, default=str)):
                raise UserError(f"teacher cache {self.directory}: its manifest does not match this stage's fingerprint "
                                "(a hash collision or an edited manifest); delete the directory")
        elif write_manifest:
            atomic_write_json(manifest, fingerprint)

    def path(self, step: int, micro: int) -> Path:
        return self.directory / f"step{step:08d}-mb{micro:04d}.safetensors"

    def load(self, step: int, micro: int, device) -> TopK | None:
        """The cached top-k of micro-batch `micro` of step `step` (0-based), or None if it was never written."""
        from safetensors import safe_open

        path = self.path(step, micro)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            if (f.metadata() or {}).get("key") != self.key:
                raise UserError(f"teacher cache file {path} belongs to another fingerprint; delete {self.directory}")
            ids, logp = f.get_tensor("ids"), f.get_tensor("logp")
        if ids.shape[-1] != self.k:
            raise UserError(f"teacher cache file {path} holds top-{ids.shape[-1]}, expected {self.k}")
        return TopK(ids, logp)

    def save(self, step: int, micro: int, topk: TopK) -> None:
        from safetensors.torch import save

        data = save({"ids": topk.ids.to(torch.int32).contiguous().cpu(), "logp": topk.logp.float().contiguous().cpu()},
                    metadata={"key": self.key})
        atomic_write_bytes(self.path(step, micro), data)
