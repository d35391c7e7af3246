"""Noise streams: Philox known answers, purity (batching/chunking invariance), statistics."""
import math

import pytest
import torch
from scipy import stats

from certssb.errors import CertssbError
from certssb.smoothing.noise import Stream, noisy_copies, normal, philox4x32, sample_ids

M32 = 0xFFFFFFFF


@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32 << 32) | M32, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    # Random123's published Philox4x32-10 test vectors; the seed's low word is key k0.
    out = philox4x32(key, *[torch.tensor(c) for c in ctr])
    assert tuple(int(o) for o in out) == expected


def test_box_muller_definition():
    # element e of (seed, stream, a, b) is output e % 2 (cos, sin) of the pair made by the
    # Philox call on counter e // 2; u1 and u2 take 53 bits of two words each
    seed, stream, a, b = 1234567890123, int(Stream.TRAIN), 7, 11
    z = normal(seed, stream, a, b, 7, dtype=torch.float64)  # odd: the last pair is cut
    import math
    expect = []
    for ctr in range(4):
        x = [int(v) for v in philox4x32(seed, *[torch.tensor(v) for v in (stream, a, b, ctr)])]
        u1 = (((x[0] << 21) | (x[1] >> 11)) + 1) * 2.0 ** -53
        u2 = ((x[2] << 21) | (x[3] >> 11)) * 2.0 ** -53
        r = math.sqrt(-2 * math.log(u1))
        expect += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    assert torch.allclose(z, torch.tensor(expect[:7], dtype=torch.float64), atol=1e-12)


def test_u1_has_53_bits_and_is_never_zero():
    # u1 = (k + 1) 2^-53 with k the top 53 bits of x0:x1: finer than 2^-32 (the old 32-bit
    # u1 capped |z| at 6.66 and lost 2^-32 of Gaussian mass per pair), and never 0.
    from certssb.smoothing.noise import _uniform53
    words = torch.tensor([0, 0, 0, 1 << 11, M32, M32, 0x80000000, 0x7FF], dtype=torch.int64)
    hi, lo = words[0::2], words[1::2]
    u1 = _uniform53(hi, lo, open_at_zero=True)
    assert u1.tolist() == [2.0 ** -53, 2.0 ** -52, 1.0, 0.5 + 2.0 ** -53]
    u2 = _uniform53(hi, lo, open_at_zero=False)
    assert u2.tolist() == [0.0, 2.0 ** -53, 1.0 - 2.0 ** -53, 0.5]


def test_tails_beyond_the_32_bit_cap_are_drawn():
    # By construction: the Box-Muller pair of words (x0, x1) = (0, small) has u1 < 2^-32, so
    # the radius exceeds sqrt(-2 ln 2^-32) = 6.66, which the old 32-bit u1 could never give.
    from certssb.smoothing.noise import _box_muller
    z0, z1 = _box_muller(*[torch.tensor([w]) for w in (0, 1 << 11, 0, 0)])
    assert float(z0) == pytest.approx((-2 * math.log(2.0 * 2.0 ** -53)) ** 0.5) and float(z0) > 6.7
    assert float(z1) == 0.0
    zmax, _ = _box_muller(*[torch.tensor([w]) for w in (0, 0, 0, 0)])
    assert float(zmax) == pytest.approx(math.sqrt(106 * math.log(2)))  # ~ 8.57, the cap now


def test_same_values_whatever_the_batching():
    seed = 3
    ids = torch.tensor([5, 0, 17, 2, 9, 1000])
    full = normal(seed, int(Stream.TRAIN), 4, ids, 37)
    for j, i in enumerate(ids.tolist()):
        assert torch.equal(normal(seed, int(Stream.TRAIN), 4, i, 37), full[j])
    # a shuffled, split batch gives the same rows
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    part = torch.cat([normal(seed, int(Stream.TRAIN), 4, ids[perm[:2]], 37),
                      normal(seed, int(Stream.TRAIN), 4, ids[perm[2:]], 37)])
    assert torch.equal(part, full[perm])


def test_prefix_of_a_longer_vector_is_the_same():
    # a vector of D elements is the prefix of one of D' > D elements (element index is the counter)
    a = normal(9, int(Stream.TEST), 2, 0, 13)
    b = normal(9, int(Stream.TEST), 2, 0, 101)
    assert torch.equal(a, b[:13])


def test_model_chunking_is_invisible():
    x = torch.rand(6, 1, 5, 5)
    sigma = torch.rand(6) + 0.1
    ids = torch.arange(6) * 3
    whole = noisy_copies(x, sigma, seed=1, stream=int(Stream.TRAIN), models=range(8), ids=ids)
    chunks = torch.cat([noisy_copies(x, sigma, seed=1, stream=int(Stream.TRAIN), models=range(0, 3), ids=ids),
                        noisy_copies(x, sigma, seed=1, stream=int(Stream.TRAIN), models=range(3, 8), ids=ids)])
    assert whole.shape == (8, 6, 1, 5, 5)
    assert torch.equal(whole, chunks)
    # and per-sample batches
    one = noisy_copies(x[2:3], sigma[2:3], seed=1, stream=int(Stream.TRAIN), models=[5], ids=ids[2:3])
    assert torch.equal(one[0, 0], whole[5, 2])


def test_test_stream_shares_noise_across_inputs():
    x = torch.zeros(4, 3, 2, 2)
    out = noisy_copies(x, 1.0, seed=0, stream=int(Stream.TEST), models=[0, 1], ids=None)
    assert torch.equal(out[0, 0], out[0, 3])
    assert not torch.equal(out[0, 0], out[1, 0])


def test_streams_seeds_and_indices_differ():
    base = normal(0, 1, 0, 0, 64)
    for other in (normal(1, 1, 0, 0, 64), normal(0, 2, 0, 0, 64), normal(0, 1, 1, 0, 64),
                  normal(0, 1, 0, 1, 64), normal(1 << 40, 1, 0, 0, 64)):
        assert not torch.equal(base, other)


def test_gaussian_statistics():
    z = normal(2024, int(Stream.SIGMA), torch.arange(8), torch.arange(8), 25_000, dtype=torch.float64).flatten()
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # neighbouring elements are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 0.01


def test_gradient_through_noisy_copies_is_the_noise():
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    out = noisy_copies(x, sigma, seed=5, stream=1, models=[2], ids=torch.tensor([0, 1, 2]))
    out.sum().backward()
    eps = normal(5, 1, 2, torch.tensor([0, 1, 2]), 4, dtype=torch.float64)
    assert torch.allclose(sigma.grad, eps.sum(1))
    assert torch.equal(x.grad, torch.ones_like(x))


def test_dtypes_and_empty():
    assert normal(0, 0, 0, 0, 0).shape == (0,)
    assert normal(0, 0, torch.empty(0, dtype=torch.long), 0, 5).shape == (0, 5)
    z32 = normal(0, 0, 0, 0, 10, dtype=torch.float32)
    z64 = normal(0, 0, 0, 0, 10, dtype=torch.float64)
    assert torch.equal(z32, z64.float())


def test_sample_ids_are_disjoint():
    a, b, c = sample_ids("train", 10), sample_ids("clean", 10), sample_ids("triggered", 10)
    assert len(set(a.tolist()) | set(b.tolist()) | set(c.tolist())) == 30


def test_errors():
    with pytest.raises(CertssbError, match="seed"):
        normal(-1, 0, 0, 0, 4)
    with pytest.raises(CertssbError, match="2\\^32"):
        normal(0, 0, -1, 0, 4)
    with pytest.raises(CertssbError, match="split"):
        sample_ids("val", 3)
    with pytest.raises(CertssbError, match="ids must have shape"):
        noisy_copies(torch.zeros(2, 3), 1.0, seed=0, stream=1, models=[0], ids=torch.tensor([0]))
