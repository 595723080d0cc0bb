"""Every codec keeps its stated error bound, on random and adversarial inputs."""

import numpy as np
import pytest

import m3db
from m3db.errors import FormatError, InvalidInputError
from m3db.storage.codec import CODECS, codec_class

SHAPES = [(2, 3, 8, 64), (1, 1, 1, 32), (15, 3, 8, 64)]


def inputs(shape, seed):
    rng = np.random.default_rng(seed)
    yield rng.standard_normal(shape).astype(np.float32)
    yield (rng.standard_normal(shape) * 1e3).astype(np.float32)  # large
    yield (rng.standard_normal(shape) * 1e-6).astype(np.float32)  # tiny (f16 subnormal range)
    yield np.zeros(shape, np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 0] = 500.0  # one outlier per vector: the worst case for a shared scale
    yield x


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_bound(name, shape):
    codec = codec_class(name)()
    for seed, x in enumerate(inputs(shape, 7)):
        data = codec.encode(x)
        assert len(data) == codec.encoded_size(shape)
        y = codec.decode(data, shape)
        assert y.dtype == np.float32 and y.shape == shape
        err = np.abs(y.astype(np.float64) - x.astype(np.float64))
        bound = codec.bound(x)
        assert (err <= bound).all(), f"{name} input {seed}: max excess {(err - bound).max()}"


def test_f32_is_exact():
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 8)).astype(np.float32)
    codec = codec_class("f32")()
    assert np.array_equal(codec.decode(codec.encode(x), x.shape), x)


def test_bounds_are_tight_enough_to_mean_something():
    # a bound of "anything" would pass the round-trip test; pin the bounds' size
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 64)).astype(np.float32)
    rel = {name: codec_class(name)().bound(x).max() / np.abs(x).max() for name in CODECS}
    assert rel["f32"] == 0
    assert rel["f16"] < 1e-3
    assert rel["int8"] < 0.005
    assert rel["int4"] < 0.08


def test_sizes_shrink_in_order():
    shape = (15, 3, 8, 64)
    sizes = [codec_class(n)().encoded_size(shape) for n in ("f32", "f16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[3] < sizes[0] / 6


def test_f16_refuses_values_out_of_range():
    with pytest.raises(InvalidInputError, match="range"):
        codec_class("f16")().encode(np.full((1, 1, 1, 8), 1e6, np.float32))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_wrong_size_is_a_format_error(name):
    codec = codec_class(name)()
    data = codec.encode(np.ones((1, 1, 2, 32), np.float32))
    with pytest.raises(FormatError, match="corrupt"):
        codec.decode(data[:-1], (1, 1, 2, 32))


def test_unknown_codec_and_version():
    with pytest.raises(InvalidInputError, match="known codecs"):
        codec_class("pq99")
    with pytest.raises(FormatError, match="version"):
        codec_class("int8", 99)


def test_untrained_codecs_take_no_params():
    assert codec_class("int8")().params() == {}
    with pytest.raises(FormatError):
        codec_class("int8").from_params({"codebook": [1, 2]})
    assert isinstance(m3db.Codec, type)
