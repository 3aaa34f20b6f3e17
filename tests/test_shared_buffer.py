"""The flat layout, parameter binding, and K real processes sharing one buffer."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_fedhog.shared_buffer import SharedFlatBuffer, bind_module, flat_layout, unbind_module
from tests.conftest import shm_files


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


def test_layout_holds_floating_parameters_then_floating_buffers() -> None:
    layout = flat_layout(_model())
    assert layout.names == (
        "0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "1.running_mean", "1.running_var"
    )  # num_batches_tracked (int64) stays private
    assert layout.num_elements == 15 + 5 + 5 + 5 + 10 + 2 + 5 + 5
    assert all(offset % 16 == 0 for offset in layout.offsets)
    assert layout.numel >= layout.num_elements


def test_binding_keeps_parameter_identity_and_values_and_shares_memory() -> None:
    model = _model()
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layout = flat_layout(model)
    flat = torch.zeros(layout.numel)
    bind_module(model, flat, layout, copy_values=True)
    assert list(model.parameters()) == params and all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    flat.add_(1.0)  # a write to the buffer is a write to the model
    assert torch.equal(model[0].weight, state["0.weight"] + 1)
    assert torch.equal(model[1].running_mean, state["1.running_mean"] + 1)
    # an optimizer step is a write to the buffer
    model[2].bias.grad = torch.ones(2)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    offset = layout.offsets[layout.names.index("2.bias")]
    torch.testing.assert_close(flat[offset : offset + 2], state["2.bias"] + 0.5)
    # autograd still works although BatchNorm writes its statistics into the buffer during forward
    model.train()
    model(torch.randn(4, 3)).sum().backward()
    unbind_module(model)
    flat.zero_()
    torch.testing.assert_close(model[2].bias.detach(), state["2.bias"] + 0.5, msg="unbound tensors own memory")


def _worker(slot: int, num_workers: int, port: int, key: str, queue: mp.Queue) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    model = _model()
    layout = flat_layout(model)
    buffer = SharedFlatBuffer.open(
        layout=layout, device=torch.device("cpu"), store=store, key=key, slot=slot,
        num_workers=num_workers, timeout=timedelta(seconds=30),
    )
    bind_module(model, buffer.flat, layout, copy_values=slot == 0)
    store.add(f"{key}/bound", 1)
    while store.add(f"{key}/bound", 0) < num_workers:
        pass
    # each worker updates its own elements, by steps, like a Hogwild! worker on a disjoint block
    for _ in range(10):
        buffer.flat[slot::num_workers].add_(1.0)
        buffer.steps[slot] += 1
    store.add(f"{key}/done", 1)
    while store.add(f"{key}/done", 0) < num_workers:
        pass
    queue.put((slot, buffer.flat.tolist(), buffer.steps.tolist(), model[0].weight.detach().tolist()))


def test_every_workers_updates_land_in_one_storage_and_no_file_remains() -> None:
    num_workers = 2  # each spawned worker imports Lightning again (~10 s of CPU): two show the sharing
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # spawned, not forked: a fork of this process (its store server thread, earlier tests' threads) once left a
    # worker hung in a lock the fork copied, and the buffer then never had all its workers
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(s, num_workers, store.port, "t", queue)) for s in range(num_workers)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=120) for _ in range(num_workers))
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    results = [(slot, torch.tensor(flat), torch.tensor(steps), torch.tensor(w)) for slot, flat, steps, w in results]
    leader_flat = results[0][1]
    initial = torch.zeros_like(leader_flat)
    layout = flat_layout(_model())
    model = _model()
    bind_module(model, initial, layout, copy_values=True)
    torch.testing.assert_close(leader_flat, initial + 10.0)  # every worker's updates landed
    for _, flat, steps, weight in results:
        assert torch.equal(flat, leader_flat), "the K workers of a device must see the same storage"
        assert steps.tolist() == [10] * num_workers
        assert torch.equal(weight, results[0][3])
    assert not shm_files()


def test_the_leader_keeps_its_memory_until_every_follower_let_go() -> None:
    """``hand_back`` (CUDA IPC lifetime at the end of fit), with the followers as threads on a real TCPStore."""
    import threading

    from lightning_fedhog.shared_buffer import hand_back

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    let_go = threading.Event()

    def follower(slot: int) -> None:
        let_go.wait(5)
        hand_back(dist.TCPStore("127.0.0.1", store.port, is_master=False), "released", slot, 3, 5.0)

    threads = [threading.Thread(target=follower, args=(slot,), name=f"fedhog-test-{slot}") for slot in (1, 2)]
    for thread in threads:
        thread.start()
    assert store.add("released", 0) == 0  # nobody let go yet: the leader would still wait
    let_go.set()
    assert hand_back(store, "released", 0, 3, 5.0) is None  # both followers came
    for thread in threads:
        thread.join()
    assert hand_back(store, "other", 0, 3, 0.05) == 0  # nobody came: gives up after the wait, with a warning

    class GoneStore:
        def add(self, key: str, value: int) -> int:
            raise dist.DistNetworkError("Connection reset by peer")

    assert hand_back(GoneStore(), "released", 1, 3, 5.0) is None  # rank 0 finished first: no error at teardown
    assert hand_back(GoneStore(), "released", 0, 3, 5.0) is None
