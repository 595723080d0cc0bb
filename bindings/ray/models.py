"""The models a Ray worker loads: picklable recipes (`BundledModels`, `TransformersModels`,
`TinyModels`, or your own callable returning (model, embedder)), each called once per worker,
and `spec_of`, the memory spec a new database built with them records.

A recipe travels to every worker instead of a loaded model (which is large and holds torch
state); `spec` is the database's MemorySpec when one exists, whose settings the model then takes
(as connect() binds the bundled model to a database it opens).
Imports: the engine's public names (`m3db`, `m3db.errors`, `m3db.extend`), `m3db.model` and the
transformers binding inside the recipes that load them; torch and ray only inside functions.
"""

import dataclasses

import m3db
from m3db.errors import DependencyError
from m3db.extend import HashEmbedder, bundled, bundled_embedder, codec_class, spec_fields

__all__ = ["BundledModels", "TinyModels", "TransformersModels", "spec_of"]


@dataclasses.dataclass(frozen=True)
class BundledModels:
    """The bundled SmolLM2 decoder and MiniLM embedder, in `memory_mode` ("dense" or "sparse")."""

    memory_mode: str | None = None

    def __call__(self, spec=None):
        """spec: an existing database's MemorySpec, whose settings the model then takes (as
        connect() binds the bundled model to a database it opens)."""
        return bundled(self.memory_mode or spec)


@dataclasses.dataclass(frozen=True)
class TransformersModels:
    """Your own Hugging Face model (a folder or a .gguf file at the same `path` on every worker)
    with the bundled embedder; on a worker that Ray gave a GPU, the model runs on it."""

    path: str
    memory_mode: str = "dense"

    def __call__(self, spec=None):
        import ray

        from m3db.bindings.transformers import HFMemoryModel

        device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"
        if device == "cuda":
            _check_cuda(ray.get_gpu_ids())
        return HFMemoryModel.from_pretrained(self.path, memory_mode=self.memory_mode, device=device), bundled_embedder()


def _check_cuda(gpu_ids):
    """Ray gave this worker GPUs: torch must see them (a CPU build of torch on a GPU node does not)."""
    import socket

    import torch

    if not torch.cuda.is_available():
        raise DependencyError(
            f"Ray gave this worker GPU {gpu_ids} on {socket.gethostname()}, but torch {torch.__version__} there sees "
            "no CUDA GPU (a CPU build of torch, or no driver): install a CUDA build of torch on the GPU nodes, "
            "or build without GPUs (gpus_per_worker=0, --gpus-per-worker 0)"
        )


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """The tiny random decoder of the real architecture and the hashing embedder
    (m3db.testing): a real model with no weights to install, for tests and demos."""

    seed: int = 0

    def __call__(self, spec=None):
        from m3db.model.memory_model import MemoryModel

        return MemoryModel.tiny(seed=self.seed), HashEmbedder()


def spec_of(models, codec) -> dict:
    """The memory spec (a dict) a new database built with `models` and `codec` records."""
    codec_class(codec)  # an unknown codec fails here, before a model loads
    model, embedder = models()
    return m3db.MemorySpec(**spec_fields(model, embedder, codec)).to_dict()
