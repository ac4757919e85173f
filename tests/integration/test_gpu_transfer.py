"""Regions in CUDA memory moved by Mooncake, device to device, with no host copy in our code.

Needs a CUDA device and the ``[cuda]`` Mooncake build; everywhere else it is skipped with the
reason (the CPU suite). The protocol is ``rdma`` when the host has an RDMA device (GPUDirect),
else ``tcp`` (the CUDA build's TCP transport copies device memory through its own buffers).
"""

from __future__ import annotations

import pytest
import torch

from epd import device as process_device
from epd.transfer import create_backend
from epd.transfer.protocols import installed_build, rdma_devices

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch sees none"),
]


@pytest.fixture()
def cuda_pair():
    build = installed_build()
    if build is None or "cuda" not in build.devices:
        pytest.skip(f"needs the [cuda] Mooncake build; installed: {build.distribution if build else 'none'}")
    protocol = "rdma" if rdma_devices() else "tcp"
    with create_backend("mooncake", protocol=protocol) as a, create_backend("mooncake", protocol=protocol) as b:
        yield a, b


def test_device_to_device_write_and_read(cuda_pair):
    a, b = cuda_pair
    nbytes = 1 << 20
    src = a.allocate(nbytes, "src", device="cuda:0")
    dst = b.allocate(nbytes, "dst", device="cuda:0")
    assert src.device.type == dst.device.type == "cuda"
    assert src.base_ptr == src.tensor.data_ptr()  # the registered address is the device pointer
    # written by a kernel just before the transfer: the backend must wait for it (the fence)
    pattern = (torch.arange(nbytes, device="cuda:0") % 251).to(torch.uint8)
    src.tensor.copy_(pattern)
    a.write(src, dst.handle, [0, 65536], [131072, 0], [65536, 4096])
    torch.cuda.synchronize()
    assert torch.equal(dst.tensor[131072:196608], pattern[:65536])
    assert torch.equal(dst.tensor[:4096], pattern[65536:69632])
    assert int(dst.tensor[4096:131072].count_nonzero()) == 0  # untouched bytes stay zero

    back = a.allocate(4096, "back", device="cuda:0")
    a.read(back, dst.handle, [0], [131072], [4096])
    assert torch.equal(back.tensor, pattern[:4096])


def test_regions_follow_the_process_device(cuda_pair):
    a, _ = cuda_pair
    process_device.set_device("cuda:0")
    try:
        region = a.allocate(4096, "kv")
    finally:
        process_device.set_device("cpu")
    assert region.device == torch.device("cuda:0")
    from epd.engine.kv_pool import KvLayout, KvPool

    layout = KvLayout(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=2, head_dim=8)
    pool = KvPool(layout, region.tensor)
    assert pool.kv.device == region.device and pool.kv.data_ptr() == region.base_ptr  # in place, no copy
