"""The fused vote ops against their PyTorch references: accumulation, ties, top-2, errors, devices."""
import pytest
import torch

from certssb.certify.bounds import top2
from certssb.certify.votes import Votes
from certssb.errors import CertssbError
from certssb.kernels.vote import UNITS_PER_ONE, reference_accumulate, vote_accumulate, vote_top2


def acc(b, c, device="cpu"):
    return (torch.zeros(b, c, dtype=torch.int64, device=device),
            torch.zeros(b, c, dtype=torch.int64, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 3, 2), (4, 0, 2), (1, 1, 1), (1, 1, 2), (7, 5, 3), (33, 17, 10)])
def test_accumulate_matches_reference(dtype, shape):
    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 4).to(dtype)
    s1, h1 = acc(*shape[1:])
    s2, h2 = acc(*shape[1:])
    vote_accumulate(logits, s1, h1)
    reference_accumulate(logits, s2, h2)
    assert torch.equal(h1, h2)
    # Each model's units may differ by one where softmax rounds differently at the last bit.
    assert ((s1 - s2).abs().max().item() if s1.numel() else 0) <= shape[0]


def test_accumulate_is_exact_and_order_free():
    logits = torch.randn(40, 11, 4, dtype=torch.float64)
    s, h = acc(11, 4)
    vote_accumulate(logits, s, h)
    s2, h2 = acc(11, 4)
    for chunk in (logits[30:], logits[:7], logits[7:30]):  # any chunking, any order
        vote_accumulate(chunk, s2, h2)
    assert torch.equal(s, s2) and torch.equal(h, h2)
    assert torch.equal(h.sum(1), torch.full((11,), 40))
    # units are round(p * 2^40): the soft sum is the softmax sum to within 1/2 unit per model
    want = torch.softmax(logits, -1).sum(0)
    assert ((s.double() / UNITS_PER_ONE - want).abs() <= 40 * 0.5 / UNITS_PER_ONE + 1e-15).all()


def test_ties_go_to_the_lowest_class():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]])
    s, h = acc(2, 4)
    vote_accumulate(logits, s, h)
    assert torch.equal(h, torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]]))
    s2, h2 = acc(2, 4)
    reference_accumulate(logits, s2, h2)
    assert torch.equal(h, h2) and torch.equal(s, s2)


def test_non_contiguous_logits():
    base = torch.randn(6, 5, 8)
    logits = base.permute(2, 1, 0)[:, :, ::2]  # [8, 5, 3], strided
    s1, h1 = acc(5, 3)
    vote_accumulate(logits, s1, h1)
    s2, h2 = acc(5, 3)
    reference_accumulate(logits.contiguous(), s2, h2)
    assert torch.equal(h1, h2) and (s1 - s2).abs().max() <= 8


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[[1e30, -1e30], [-3e38, 3e38], [0.0, 0.0]]])
    s, h = acc(3, 2)
    vote_accumulate(logits, s, h)
    assert torch.equal(s, torch.tensor([[UNITS_PER_ONE, 0], [0, UNITS_PER_ONE],
                                        [UNITS_PER_ONE // 2, UNITS_PER_ONE // 2]]))


@pytest.mark.parametrize("by_count", [False, True])
def test_top2_matches_reference(by_count):
    g = torch.Generator().manual_seed(3)
    soft = torch.randint(0, 5, (200, 6), generator=g)  # many ties
    hard = torch.randint(0, 5, (200, 6), generator=g)
    cls, units, counts = vote_top2(soft, hard, by_count=by_count)
    key = hard if by_count else soft
    t1, v1, t2, v2 = top2(key)
    assert torch.equal(cls[:, 0], t1) and torch.equal(cls[:, 1], t2)
    assert torch.equal(units, soft.gather(1, cls)) and torch.equal(counts, hard.gather(1, cls))
    empty = vote_top2(soft[:0], hard[:0], by_count=by_count)
    assert all(t.shape == (0, 2) for t in empty)


def test_votes_backends_agree():
    logits = torch.randn(25, 9, 3)
    a, b = Votes.zeros(9, 3), Votes.zeros(9, 3)
    a.add_logits(logits, backend="kernels")
    b.add_logits(logits, backend="reference")
    assert a.models == b.models == 25
    assert torch.equal(a.hard_count, b.hard_count) and (a.soft_units - b.soft_units).abs().max() <= 25


def test_opcheck():
    logits = torch.randn(4, 3, 5)
    s, h = acc(3, 5)
    torch.library.opcheck(torch.ops.certssb.vote_accumulate.default, (logits, s, h))
    torch.library.opcheck(torch.ops.certssb.vote_top2.default, (s, h, True))


def test_errors():
    s, h = acc(3, 2)
    with pytest.raises(CertssbError, match="do not match the accumulators"):
        vote_accumulate(torch.randn(2, 4, 2), s, h)
    with pytest.raises(CertssbError, match="NaN or Inf"):
        vote_accumulate(torch.tensor([[[0.0, float("nan")]] * 3]), s, h)
    with pytest.raises(CertssbError, match="int64 accumulators"):
        vote_accumulate(torch.randn(2, 3, 2), s.double(), h)
    with pytest.raises(CertssbError, match="shape \\[Mc, B, C\\]"):
        vote_accumulate(torch.randn(3, 2), s, h)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.certssb.vote_accumulate(torch.randn(1, 2, 3), torch.zeros(3, 2, dtype=torch.long).t(),
                                          torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(CertssbError, match="C >= 2"):
        vote_top2(s[:, :1], h[:, :1], by_count=True)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    logits = (torch.randn(50, 37, 10) * 3).to(dtype)
    s1, h1 = acc(37, 10)
    vote_accumulate(logits, s1, h1)
    s2, h2 = acc(37, 10, "cuda")
    vote_accumulate(logits.cuda(), s2, h2)
    assert torch.equal(h1, h2.cpu()) and (s1 - s2.cpu()).abs().max() <= 50
    for by_count in (False, True):
        for a, b in zip(vote_top2(s1, h1, by_count=by_count), vote_top2(s1.cuda(), h1.cuda(), by_count=by_count)):
            assert torch.equal(a, b.cpu())
    torch.library.opcheck(torch.ops.certssb.vote_accumulate.default, (logits.cuda(), s2, h2))
