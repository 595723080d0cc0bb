"""m3db.bindings.transformers: explicit memories for your own Hugging Face transformers model
(`pip install 'm3db[transformers]'`; docs/bindings.md).

    from m3db.bindings.transformers import HFMemoryModel
    model = HFMemoryModel.from_pretrained("path/to/Qwen2.5-0.5B-Instruct", device="cpu")
    db = m3db.connect("kb.m3db", model=model)

The rooms: `model.py` (`HFMemoryModel`, the model interface the engine calls, and its
refusals), `decoder.py` (`HFDecoder`: the transformers model's own modules driven in the
bundled decoder's shape, memories read through transformers' attention interface),
`tokenizer.py` (`HFTokenizer`: a transformers tokenizer in the generation loop's shape).

Imports: this package re-exports only. Its modules import torch, transformers and `m3db.model`
(the decoder and tokenizer), never the engine (`m3db`): `m3db.connect(path, model=...)` reaches
the model only through its verbs.
"""

from .decoder import SUPPORTED_FAMILIES, UnsupportedModel
from .model import AdapterError, AdapterRequired, HFMemoryModel

__all__ = ["AdapterError", "AdapterRequired", "HFMemoryModel", "SUPPORTED_FAMILIES", "UnsupportedModel"]
