"""bnopt.memory counts the bytes of the tensors a call makes and holds at once: checked against allocations
whose sizes are known, with views, in-place ops, tensors made before the call and autograd's buffers."""

import torch

from bnopt.memory import PeakTensorMemory, peak_tensor_bytes


def test_the_count_follows_allocations_and_frees():
    made_before = torch.ones(1000)
    with PeakTensorMemory() as memory:
        a = torch.ones(1000)  # 4000 bytes
        view = a.view(10, 100)
        a.add_(1)
        made_before.mul_(2)  # in place, on a tensor the call did not make
        made_before[:10].view(-1)
        assert (memory.current, memory.peak) == (4000, 4000)  # views and in-place ops allocate nothing
        del a, view
        b, c = torch.ones(500), torch.ones(500)  # a's storage was freed before they were made
        assert (memory.current, memory.peak) == (4000, 4000)
        d = torch.ones(3000, dtype=torch.float64)
        pair = torch._foreach_add([b, c], 1.0)  # a list of fresh outputs
        assert (memory.current, memory.peak) == (4000 + 24000 + 4000, 32000)
        del d
    assert (memory.current, memory.peak) == (8000, 32000)  # b, c and pair outlive the call; d does not
    assert len(pair) == 2


def test_autograd_buffers_count_while_held():
    """The product w * 2 is freed as soon as sum() has used it (sum keeps only a shape); the backward makes the
    seed (one float) and the gradient (100 floats), which stays as w.grad."""
    w = torch.ones(100, requires_grad=True)

    def step():
        (w * 2).sum().backward()

    with PeakTensorMemory() as memory:
        step()
    assert (memory.peak, memory.current) == (400 + 4 + 4, 400)
    assert peak_tensor_bytes(lambda: torch.ones(10, 10).t().contiguous()) == 800  # a transposed copy: two
