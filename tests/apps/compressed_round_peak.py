"""Prints how much a compressed round of a large block raises this process's peak memory (bytes).

    python tests/apps/compressed_round_peak.py NUMEL CODEC

One leader (a gloo group of one), a block of NUMEL fp32 elements whose reference is ready, so the round sends CODEC.
The allocator's mmap threshold is fixed first (glibc's ``mallopt``, also when the process is forked rather than
started), so that every large buffer is mapped when allocated and unmapped when freed: the peak resident size then
follows the live buffers instead of whatever the allocator keeps for reuse.
"""

import ctypes
import resource
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_fedhog.compression import SharedReference

M_MMAP_THRESHOLD = -3
ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 65536)
torch.set_num_threads(1)
numel, codec = int(sys.argv[1]), sys.argv[2]
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
group = dist.ProcessGroupGloo(dist.PrefixStore("pg", store), 0, 1, timedelta(seconds=60))
live = torch.ones(numel)
shared = SharedReference(numel, 1, live.device)
shared.values.fill_(0.5)
shared.tracked(0)
control = torch.zeros(4)
shared.start_(torch.ones(4096), (0, 4096), group, 1, control, codec)(accept=lambda summed: True, stats={})

def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

before = peak()
shared.start_(live, (0, numel), group, 1, control, codec)(accept=lambda summed: True, stats={})
print(peak() - before)
