"""Test helpers shared by the scheduler and STS tests: a CPU proxy for "no host sync"."""

import pytest
import torch

_HOST_READS = {"item", "tolist", "nonzero", "numpy", "cpu", "__bool__", "__int__", "__float__"}


def traced(fn):
    """torch.compile(fn, fullgraph=True) with a backend that fails on host reads.

    CPU proxy for "no host synchronisation": fullgraph fails on a Python branch on a
    tensor value; the backend fails on .item()/int()/nonzero()/boolean-mask indexing,
    which this torch traces into the graph (as item / _local_scalar_dense / unbacked
    sizes checked by _assert_scalar) instead of breaking it."""
    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            target = str(node.target)
            bad = (node.op == "call_method" and node.target in _HOST_READS) or any(
                word in target for word in ("nonzero", "_local_scalar_dense", "_assert_scalar"))
            assert not bad, f"host read in the traced graph: {node.format_node()}"
        return gm.forward
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while a module's tests run (they run many tiny ops; on a shared
    2-core machine threading only adds contention), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
