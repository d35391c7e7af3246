"""The fused noise op against the pure-PyTorch Philox reference: values, gradients, errors, devices."""
import pytest
import torch

from certssb.errors import CertssbError
from certssb.kernels import seed_to_int64, using_backend
from certssb.kernels.noise import noise
from certssb.smoothing.noise import Stream, noisy_copies, normal

SEEDS = [0, 12345, (1 << 64) - 1, (1 << 63) + 7]
DTYPES = [torch.float32, torch.float64]


def reference(x, sigma, ids, seed, stream, k0, models):
    return noisy_copies(x, sigma, seed=seed, stream=stream, models=list(range(k0, k0 + models)),
                        ids=ids, backend="reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (3, 5), (7, 1, 5, 3), (2, 3, 8, 8), (5, 257)])
def test_matches_reference_every_element(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g, dtype=dtype)
    b = shape[0]
    sigma = torch.rand(b, generator=g, dtype=dtype) + 0.05
    ids = torch.randint(0, 1 << 32, (b,), generator=g)
    for seed in SEEDS:
        out = noise(x, sigma, ids, seed=seed, stream=int(Stream.TRAIN), k0=3, models=4)
        ref = reference(x, sigma, ids, seed, int(Stream.TRAIN), 3, 4)
        assert out.shape == (4, *shape) and out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_float32_is_bitwise_the_reference_on_cpu():
    x = torch.rand(64, 784)
    sigma = torch.rand(64) + 0.1
    ids = torch.arange(64) * 17
    out = noise(x, sigma, ids, seed=99, stream=1, k0=0, models=3)
    assert torch.equal(out, reference(x, sigma, ids, 99, 1, 0, 3))


def test_normals_themselves_match_the_definition():
    # x = 0, sigma = 1 leaves eps, which must equal `normal` (the Random123-checked reference).
    d = 1001  # not a multiple of 4: the last Philox block is cut
    out = noise(torch.zeros(2, d, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                torch.tensor([5, (1 << 32) - 1]), seed=7, stream=3, k0=(1 << 32) - 2, models=2)
    ref = normal(7, 3, torch.tensor([[(1 << 32) - 2], [(1 << 32) - 1]]),
                 torch.tensor([[5, (1 << 32) - 1]]), d, dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # Tails are reproduced too (|z| up to 8.57 by construction, u1 having 53 bits).
    assert out.abs().max() < 8.6


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_rounds_once(dtype, atol):
    x = torch.rand(6, 40)
    sigma = torch.rand(6) + 0.1
    ids = torch.arange(6)
    out = noise(x.to(dtype), sigma.to(dtype), ids, seed=1, stream=1, k0=0, models=2)
    ref = reference(x.to(dtype).double(), sigma.to(dtype).double(), ids, 1, 1, 0, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


def test_non_contiguous_inputs():
    base = torch.rand(5, 6, 8, dtype=torch.float64)
    x = base.transpose(1, 2)  # [5, 8, 6], non-contiguous
    sigma = torch.rand(10, dtype=torch.float64)[::2] + 0.1
    ids = torch.arange(10)[::2]
    out = noise(x, sigma, ids, seed=4, stream=2, k0=1, models=2)
    torch.testing.assert_close(out, reference(x.contiguous(), sigma, ids, 4, 2, 1, 2), rtol=0, atol=1e-12)
    cl = torch.rand(3, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    out = noise(cl, torch.ones(3), torch.arange(3), seed=4, stream=2, k0=0, models=1)
    torch.testing.assert_close(out, reference(cl, torch.ones(3), torch.arange(3), 4, 2, 0, 1), rtol=0, atol=1e-6)


def test_same_noise_whatever_the_chunking():
    x = torch.rand(10, 33, dtype=torch.float64)
    sigma = torch.full((10,), 0.5, dtype=torch.float64)
    ids = torch.arange(10) + 100
    whole = noise(x, sigma, ids, seed=5, stream=1, k0=0, models=6)
    parts = [noise(x[i:i + 3], sigma[i:i + 3], ids[i:i + 3], seed=5, stream=1, k0=k, models=2)
             for k in (0, 2, 4) for i in (0, 3, 6, 9)]
    rebuilt = torch.cat([torch.cat(parts[j * 4:(j + 1) * 4], dim=1) for j in range(3)])
    assert torch.equal(whole, rebuilt)


def test_gradcheck_x_and_sigma():
    x = torch.rand(3, 2, 5, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(3, dtype=torch.float64) + 0.2).requires_grad_()
    ids = torch.tensor([0, 9, 4])
    assert torch.autograd.gradcheck(
        lambda x, s: noise(x, s, ids, seed=11, stream=3, k0=2, models=3), (x, sigma))


def test_backward_matches_reference_autograd():
    x = torch.rand(4, 50, requires_grad=True)
    sigma = (torch.rand(4) + 0.2).requires_grad_()
    ids = torch.arange(4)
    w = torch.randn(3, 4, 50)
    (noise(x, sigma, ids, seed=2, stream=1, k0=0, models=3) * w).sum().backward()
    gx, gs = x.grad.clone(), sigma.grad.clone()
    x.grad = sigma.grad = None
    (reference(x, sigma, ids, 2, 1, 0, 3) * w).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gs, sigma.grad, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x = torch.rand(3, 7, requires_grad=True)
    sigma = (torch.rand(3) + 0.1).requires_grad_()
    args = (x, sigma, torch.arange(3), seed_to_int64((1 << 64) - 5), 1, 4, 2)
    torch.library.opcheck(torch.ops.certssb.noise.default, args)
    torch.library.opcheck(torch.ops.certssb.noise_sigma_grad.default,
                          (torch.rand(2, 3, 7), torch.arange(3), 3, 1, 4))


def test_noisy_copies_dispatches_both_backends_identically():
    x = torch.rand(6, 1, 4, 4)
    sigma = torch.rand(6) + 0.1
    ids = torch.arange(6)
    for models in ([0, 1, 2], [5, 2, 3], []):
        a = noisy_copies(x, sigma, seed=3, stream=1, models=models, ids=ids, backend="kernels")
        b = noisy_copies(x, sigma, seed=3, stream=1, models=models, ids=ids, backend="reference")
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with using_backend("reference"):  # the context default, and the TEST stream (ids None)
        b = noisy_copies(x, 0.25, seed=3, stream=2, models=[7], ids=None)
    a = noisy_copies(x, 0.25, seed=3, stream=2, models=[7], ids=None)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=torch.ones(2)), "sigma must be a floating tensor of shape"),
    (dict(ids=torch.arange(3).int()), "ids must be an int64"),
    (dict(ids=torch.tensor([0, 1, 1 << 32])), r"ids must lie in \[0, 2\^32\)"),
    (dict(ids=torch.tensor([0, -1, 2])), r"ids must lie in \[0, 2\^32\)"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(seed=1 << 64), "seed must be an integer"),
    (dict(stream=-2), "stream must be an integer"),
    (dict(k0=(1 << 32) - 1, models=2), "model indices"),
    (dict(x=torch.ones(3, 2, dtype=torch.int64)), "x must be a floating tensor"),
])
def test_errors_say_what_is_wrong(kwargs, match):
    args = dict(x=torch.rand(3, 2), sigma=torch.ones(3), ids=torch.arange(3), seed=0, stream=1, k0=0,
                models=1)
    args.update(kwargs)
    with pytest.raises(CertssbError, match=match):
        noise(**args)


def test_native_checks_catch_raw_op_misuse():
    with pytest.raises(RuntimeError, match="sigma must have shape"):
        torch.ops.certssb.noise(torch.rand(3, 2), torch.ones(2), torch.arange(3), 0, 1, 0, 1)
    with pytest.raises(RuntimeError, match="ids must lie in"):
        torch.ops.certssb.noise(torch.rand(3, 2), torch.ones(3), torch.tensor([0, 1, -5]), 0, 1, 0, 1)


@pytest.mark.parametrize("bad", [-5, 1 << 32])
def test_native_cpu_ops_reject_out_of_range_ids(bad):
    # The raw ops, past the Python wrapper: both noise ops check id values natively
    # (csrc/checks.h, shared by the CPU kernels and the CUDA glue).
    ids = torch.tensor([0, bad, 2])
    with pytest.raises(RuntimeError, match=r"noise: ids must lie in \[0, 2\^32\), got .* at position 1"):
        torch.ops.certssb.noise(torch.rand(3, 2), torch.ones(3), ids, 0, 1, 0, 1)
    with pytest.raises(RuntimeError, match=r"noise_sigma_grad: ids must lie in \[0, 2\^32\)"):
        torch.ops.certssb.noise_sigma_grad(torch.rand(1, 3, 2), ids, 0, 1, 0)


@pytest.mark.needs_cuda
def test_native_cuda_ops_reject_out_of_range_ids():
    # The CUDA glue uses the same check as the CPU kernel (it copies ids to the host).
    # Needs a GPU, so it is skipped on CPU-only machines.
    ids = torch.tensor([0, 1 << 32, 2], device="cuda")
    with pytest.raises(RuntimeError, match="ids must lie in"):
        torch.ops.certssb.noise(torch.rand(3, 2, device="cuda"), torch.ones(3, device="cuda"), ids, 0, 1, 0, 1)
    with pytest.raises(RuntimeError, match="ids must lie in"):
        torch.ops.certssb.noise_sigma_grad(torch.rand(1, 3, 2, device="cuda"), ids, 0, 1, 0)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    x = torch.rand(9, 3, 7, 5).to(dtype)
    sigma = (torch.rand(9) + 0.1).to(dtype)
    ids = torch.randint(0, 1 << 32, (9,))
    cpu = noise(x, sigma, ids, seed=(1 << 63) + 3, stream=1, k0=10, models=5)
    gpu = noise(x.cuda(), sigma.cuda(), ids.cuda(), seed=(1 << 63) + 3, stream=1, k0=10, models=5)
    atol = 1e-6 if dtype in DTYPES else 1e-2
    torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=0, atol=atol)
    ref = reference(x.double(), sigma.double(), ids, (1 << 63) + 3, 1, 10, 5)
    torch.testing.assert_close(gpu.cpu().double(), ref, rtol=0, atol=atol if dtype in DTYPES else 5e-2)


@pytest.mark.needs_cuda
def test_cuda_backward_and_opcheck():
    x = torch.rand(4, 33, dtype=torch.float64, device="cuda", requires_grad=True)
    sigma = (torch.rand(4, dtype=torch.float64, device="cuda") + 0.2).requires_grad_()
    ids = torch.arange(4, device="cuda")
    assert torch.autograd.gradcheck(lambda x, s: noise(x, s, ids, seed=1, stream=3, k0=0, models=2),
                                    (x, sigma))
    torch.library.opcheck(torch.ops.certssb.noise.default, (x, sigma, ids, 1, 3, 0, 2))
    g = torch.randn(2, 4, 33, dtype=torch.float64)
    cpu = torch.ops.certssb.noise_sigma_grad(g, ids.cpu(), 1, 3, 0)
    gpu = torch.ops.certssb.noise_sigma_grad(g.cuda(), ids, 1, 3, 0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
