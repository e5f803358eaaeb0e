"""The 8-bit-weight prompt GEMMs (jamba_cli/kernels/triton/gemm8.py) against dequantize-then-matmul in fp32.

On a CPU they run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), on a GPU compiled. Tiles
are small and the shapes odd, so that row tiles straddle group boundaries, groups are empty or one row
long, and the last M, N and K blocks are partial. float8 weights run in the interpreter too, and on GPUs
of sm89 or later; the CUDA-graph replays and the bf16 products of a real tl.dot on a GPU only.
(Speeds: benchmarks/bench_gemm8.py.)
"""

import pytest
import torch

from conftest import DEVICE, assert_close

pytest.importorskip("triton")

from jamba_cli.kernels.triton import gemm8  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# small tiles for the interpreter, both operand orders; K blocks of 32 leave a tail on K = 48
SMALL = [(16, 16, 32, 1, 1, True), (16, 32, 16, 1, 1, False)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def int8(gen, *shape):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).to(DEVICE)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


def scales(gen, *shape):
    return (torch.rand(*shape, generator=gen) * 0.02 + 0.001).to(DEVICE)


def reference(x, w, scale, offs=None):
    """Dequantize, then matmul in fp32 (each group its own weight)."""
    x = x.float()
    if offs is None:
        return x @ (w.float() * scale[:, None]).T
    ends = offs.tolist()
    parts = [x[a:b] @ (w[g].float() * scale[g][:, None]).T for g, (a, b) in enumerate(zip([0] + ends[:-1], ends))]
    return torch.cat(parts)


@pytest.mark.parametrize("config", SMALL)
@pytest.mark.parametrize("m, n, k", [(37, 29, 48), (32, 32, 64)])  # partial M/N/K blocks, and none
def test_dense_int8(gen, config, m, n, k):
    x, w, scale = randn(gen, m, k), int8(gen, n, k), scales(gen, n)
    got = gemm8.linear8(x, w, scale, config=config)
    assert got.dtype == x.dtype and got.shape == (m, n)
    assert_close(got, reference(x, w, scale))


@pytest.mark.parametrize("config", SMALL)
def test_grouped_int8_uneven_groups(gen, config):
    # empty groups first, between and last; a group of 1 row; groups that start mid-tile and span tiles
    counts = [0, 10, 0, 1, 23, 0, 3, 0]
    m, n, k = sum(counts), 29, 48
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    x, w, scale = randn(gen, m, k), int8(gen, len(counts), n, k), scales(gen, len(counts), n)
    assert_close(gemm8.grouped_linear8(x, w, scale, offs, config=config), reference(x, w, scale, offs))


def test_grouped_all_rows_in_one_group(gen):
    m, n, k, groups = 40, 24, 32, 4
    offs = torch.tensor([0, 0, m, m], dtype=torch.int32, device=DEVICE)
    x, w, scale = randn(gen, m, k), int8(gen, groups, n, k), scales(gen, groups, n)
    got = gemm8.grouped_linear8(x, w, scale, offs, config=SMALL[0])
    assert_close(got, x @ (w[2].float() * scale[2][:, None]).T)


def test_grouped_of_strided_expert_views(gen):
    # the first half of a stacked gate_up (G, 2I, K), as the expert layers hold it: a view, not a copy
    n, k, groups = 24, 32, 3
    offs = torch.tensor([5, 5, 20], dtype=torch.int32, device=DEVICE)
    x, w, scale = randn(gen, 20, k), int8(gen, groups, 2 * n, k), scales(gen, groups, 2 * n)
    got = gemm8.grouped_linear8(x, w[:, :n], scale[:, :n], offs, config=SMALL[1])
    assert_close(got, reference(x, w[:, :n], scale[:, :n], offs))


def test_bf16_activations_round_once(gen):
    # bf16 in and out: the interpreter truncates the final cast (a GPU rounds), within bf16's tolerance
    m, n, k = 33, 40, 64
    x, w, scale = randn(gen, m, k).bfloat16(), int8(gen, n, k), scales(gen, n)
    got = gemm8.linear8(x, w, scale, config=SMALL[0])
    assert got.dtype == torch.bfloat16
    assert_close(got, reference(x, w, scale).bfloat16())


def test_empty_inputs(gen):
    w, scale = int8(gen, 3, 16, 32), scales(gen, 3, 16)
    offs = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    assert gemm8.grouped_linear8(randn(gen, 0, 32), w, scale, offs).shape == (0, 16)
    assert gemm8.linear8(randn(gen, 0, 32), w[0], scale[0]).shape == (0, 16)


def test_bad_arguments_name_the_parameter(gen):
    x, w, scale = randn(gen, 4, 40), int8(gen, 8, 40), scales(gen, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemm8.linear8(x, w, scale)
    with pytest.raises(ValueError, match="`w` must be int8"):
        gemm8.linear8(randn(gen, 4, 32), randn(gen, 8, 32), scales(gen, 8))
    with pytest.raises(ValueError, match="`offs`"):
        gemm8.grouped_linear8(randn(gen, 4, 32), int8(gen, 2, 8, 32), scales(gen, 2, 8),
                              torch.tensor([4, 4], device=DEVICE))


@pytest.mark.parametrize("config", gemm8.TILES)
def test_benchmark_tiles_are_valid(gen, config):
    # every tile the benchmark sweeps, on a shape with partial blocks everywhere
    counts = [0, 70, 1, 130]
    m, n, k = sum(counts), 136, 144
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    x, w, scale = randn(gen, m, k), int8(gen, len(counts), n, k), scales(gen, len(counts), n)
    assert_close(gemm8.grouped_linear8(x, w, scale, offs, config=config), reference(x, w, scale, offs))


fp8 = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                         reason="Triton converts float8 e4m3 on sm89 or later only")


@fp8
@pytest.mark.parametrize("config", [None, *SMALL])
def test_grouped_float8(gen, config):
    counts = [0, 40, 1, 20]
    m, n, k = sum(counts), 40, 80
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    w = randn(gen, len(counts), n, k).to(torch.float8_e4m3fn)
    x, scale = randn(gen, m, k), scales(gen, len(counts), n)
    assert_close(gemm8.grouped_linear8(x, w, scale, offs, config=config), reference(x, w, scale, offs))


@fp8
def test_dense_float8_bf16(gen):
    x, w, scale = randn(gen, 30, 64).bfloat16(), randn(gen, 20, 64).to(torch.float8_e4m3fn), scales(gen, 20)
    assert_close(gemm8.linear8(x, w, scale, config=SMALL[0]), reference(x, w, scale).bfloat16())


@cuda
@pytest.mark.parametrize("config", [None, gemm8.TILES[-1]])  # the default (swapped) and an unswapped tile
def test_grouped_int8_bf16_on_gpu(gen, config):
    counts = [0, 300, 1, 0, 211, 17]
    m, n, k = sum(counts), 520, 4096 + 64
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    x, w, scale = randn(gen, m, k).bfloat16(), int8(gen, len(counts), n, k), scales(gen, len(counts), n)
    got = gemm8.grouped_linear8(x, w, scale, offs, config=config)
    assert_close(got, reference(x, w, scale, offs), 1e-2, norm=True)


@cuda
def test_grouped_replays_from_a_cuda_graph_with_new_offs(gen):
    # capture once, then new group boundaries written into the same offs tensor: no host sync in the way
    groups, m, n, k = 6, 250, 136, 256
    x, w, scale = randn(gen, m, k).bfloat16(), int8(gen, groups, n, k), scales(gen, groups, n)
    offs = torch.tensor([40, 40, 41, 200, 250, 250], dtype=torch.int32, device=DEVICE)
    gemm8.grouped_linear8(x, w, scale, offs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm8.grouped_linear8(x, w, scale, offs)
    for ends in ([40, 40, 41, 200, 250, 250], [0, 0, 0, 0, 0, 250], [250] * 6, [1, 2, 130, 131, 249, 250]):
        offs.copy_(torch.tensor(ends, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference(x, w, scale, offs), 1e-2, norm=True, msg=str(ends))
