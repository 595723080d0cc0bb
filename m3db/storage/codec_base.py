"""The codec contract: `Codec`, the base class every codec subclasses.

Owns what a codec is (encode, decode, its error bound, its encoded size, its stored parameters
and the blob versions it reads), not any codec: the untrained ones and the registry that names
them all live in codec.py, the trained product quantizer in pq.py. Both import this module, and
codec.py imports pq.py to register it, so this module must import neither (nor anything of m3db
but errors): it is what keeps codec.py and pq.py out of an import cycle.
"""

from typing import Self

import numpy as np

from ..errors import FormatError


class Codec:
    """Base class: subclasses set `name`, `version` and implement encode/decode/bound."""

    name = ""
    version = 0
    trained = False

    def encode(self, x, *, part="keys") -> bytes:
        """float32 array (..., D) -> bytes. part: "keys" or "values" (a trained codec has a
        codebook for each; the others ignore it)."""
        raise NotImplementedError

    def check(self, x) -> None:
        """Raise InvalidInputError if `x` holds values this codec cannot represent."""

    def decode(self, data, shape, *, part="keys") -> np.ndarray:
        """bytes -> float32 array of `shape`; raises FormatError if the size is wrong."""
        raise NotImplementedError

    def bound(self, x) -> np.ndarray:
        """Per-element worst-case |x - decode(encode(x))|, as a float64 array shaped like x."""
        raise NotImplementedError

    def encoded_size(self, shape) -> int:
        """How many bytes encode() returns for an array of `shape`."""
        raise NotImplementedError

    def params(self) -> dict[str, object]:
        """Parameters to store in the catalog (plain msgpack-able values); none for untrained codecs."""
        return {}

    @classmethod
    def reads(cls, version) -> bool:
        """Whether this m3db reads blobs of `version` of this codec (a codec that changed its
        blobs lists its older versions)."""
        return version == cls.version

    @classmethod
    def from_params(cls, params, *, version=None) -> Self:
        """The codec from its stored parameters, at `version` (None: this m3db's; a trained codec
        keeps the version of its catalog row)."""
        if params:
            raise FormatError(f"codec {cls.name!r} takes no parameters, got {sorted(params)}")
        return cls()

    def _check_size(self, data, shape):
        want = self.encoded_size(shape)
        if len(data) != want:
            raise FormatError(
                f"codec {self.name} v{self.version}: {len(data)} bytes for shape {tuple(shape)}, "
                f"expected {want}; the blob is corrupt"
            )

    def __repr__(self):
        return f"<Codec {self.name} v{self.version}>"
