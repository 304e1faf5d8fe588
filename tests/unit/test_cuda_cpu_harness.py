"""The CPU harness's own economy (tests/support/cuda_cpu.py): a kernel runs in as few orders of
threads as can still show its races, and the fibers' stacks are mapped once and reused. Kernels
written here, small: each test costs well under a second once compiled.
"""

import cuda_cpu
import numpy as np
import pytest
from cuda_support import cxx_or_skip

# every thread writes the same element: the last one to run wins, so the result names the order
LAST_WRITER = r"""
extern "C" __global__ void last_writer(float* out, const int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[0] = (float)i;
}
"""
# a block-wide sum through shared memory, with the barriers it needs
BLOCK_SUM = r"""
extern "C" __global__ void block_sum(const float* x, float* out) {
    __shared__ float part[1024];
    const int t = threadIdx.x;
    part[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (t < k) part[t] += part[t + k];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = part[0];
}
"""


@pytest.fixture(autouse=True)
def tools():
    cxx_or_skip()


def test_a_race_through_global_memory_in_a_raw_kernel_is_caught():
    """A RawKernel without barriers still runs forward and reversed: the last writer differs."""
    with pytest.raises(cuda_cpu.Mismatch, match="a race: argument 0"):
        cuda_cpu.raw_kernel(
            LAST_WRITER, "last_writer", (3,), (128,), (np.zeros(1, np.float32), np.int32(300))
        )


def test_a_race_through_a_raw_output_of_an_elementwise_kernel_is_caught():
    """An ElementwiseKernel writing a raw output runs in two orders too (y[0] from every thread)."""
    spec = ("float32 x", "raw float32 y", "y[0] = x", "gpunet_test_raw_race")
    with pytest.raises(cuda_cpu.Mismatch, match="a race: argument y"):
        cuda_cpu.elementwise(spec, [np.arange(300, dtype=np.float32), np.zeros(1, np.float32)])


def test_each_kernel_runs_in_the_orders_its_races_need():
    """Three orders with barriers or shared memory, two for a RawKernel without, one for an
    ElementwiseKernel whose threads touch only their own elements (counted by the harness)."""

    def orders(run):
        before = cuda_cpu.stats["orders"]
        run()
        return cuda_cpu.stats["orders"] - before

    x = np.arange(512, dtype=np.float32)
    assert (
        orders(
            lambda: cuda_cpu.raw_kernel(
                BLOCK_SUM, "block_sum", (2,), (256,), (x, np.zeros(2, np.float32))
            )
        )
        == 3
    )
    assert (
        orders(
            lambda: cuda_cpu.raw_kernel(
                LAST_WRITER, "last_writer", (1,), (1,), (np.zeros(1, np.float32), np.int32(1))
            )
        )
        == 2
    )
    spec = ("float32 x", "float32 y", "y = x * x", "gpunet_test_square")
    assert orders(lambda: cuda_cpu.elementwise(spec, [x, np.zeros_like(x)])) == 1
    aliased = ("raw float32 x", "float32 y", "y = x[i] + 1", "gpunet_test_aliased")
    # x is y: the raw reads meet the writes
    assert orders(lambda: cuda_cpu.elementwise(aliased, [x, x])) == 2


def test_the_fibers_stacks_are_mapped_once_and_reused():
    """The pool is sized by the largest block so far and kept: a smaller block after it, and every
    later launch, use the same stacks (a pool per block was 16 MiB zero-filled per 256 threads)."""

    def run(threads):
        x = np.arange(2 * threads, dtype=np.float32)
        out = cuda_cpu.raw_kernel(
            BLOCK_SUM, "block_sum", (2,), (threads,), (x, np.zeros(2, np.float32))
        )[1]
        np.testing.assert_array_equal(out, x.reshape(2, threads).sum(axis=1))  # exact: integers
        return cuda_cpu.stack_pool("block_sum", BLOCK_SUM)

    run(64)
    address, threads = run(512)
    assert threads >= 512
    assert run(128) == (address, threads)
    assert run(512) == (address, threads)
