"""How the run's processes meet: the default process group, and the store keys of one ``fit``.

Every worker joins one gloo group over all workers (NCCL allows one rank per GPU, and the K workers of a device
share one); its store carries the counters and flags that are not collectives, under keys unique to one ``fit`` and
one torchrun restart.
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment

from lightning_fedhog import internals

STARTUP_TIMEOUT = timedelta(minutes=5)
"""The least time the processes get to start and meet, whatever `timeout` (that one bounds collectives)."""

_joining = threading.Event()


def joining_default_group() -> bool:
    """Whether this process is in :func:`join_default_group`: a native wait for every worker that a Ctrl-C cannot
    interrupt (see :mod:`lightning_fedhog.interrupt`)."""
    return _joining.is_set()


def store_key(name: str, generation: int, attempt: str) -> str:
    """A rendezvous-store key unique to one ``fit``: torchrun restarts may reuse the store, so the key holds the
    attempt's token (:func:`attempt_token`); a second ``fit`` in the same processes gets the next ``generation``."""
    return f"fedhog/{attempt}/{generation}/{name}"


def present_values(store: Any, keys: list[str]) -> dict[str, bytes]:
    """The values of those ``keys`` that exist in ``store``, by key (a look and a read each: ``multi_get`` would wait
    for the missing ones)."""
    return {key: store.get(key) for key in keys if store.check([key])}


def attempt_token() -> str:
    """A name for this start of the run's processes, the same on every rank (rank 0's, broadcast: a collective).

    torchrun's ``TORCHELASTIC_RESTART_COUNT`` cannot serve: each agent counts its own restarts, and with the c10d
    rendezvous an agent whose workers are stopped for a membership change (the other node's worker died and it
    rejoins) does not count one, so two workers of one attempt can read different counts and write under keys
    the other never reads.
    """
    token = [f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-{uuid.uuid4().hex[:12]}"]
    dist.broadcast_object_list(token, src=0)
    return str(token[0])


def restart_safe_store(environment: ClusterEnvironment, timeout: timedelta) -> dict[str, Any]:
    """The ``store=`` argument for ``init_process_group`` that lets a torchrun restart connect, or nothing.

    Under ``torchrun`` the ranks share the elastic agent's ``TCPStore`` (``TORCHELASTIC_USE_AGENT_STORE=True``),
    and the agent keeps that one store for every restart: with the default static rendezvous and, in torch 2.14,
    with ``--rdzv-backend=c10d`` too. ``init_process_group`` uses it without a per-attempt prefix, so the
    restarted ranks read the gloo addresses that the dead ranks of the previous attempt left there and fail or
    hang connecting to closed ports. That hits ``strategy="ddp"`` the same way; older torch releases prefixed the
    keys with the restart count, which is what this brings back, for the default group and every key derived
    from it (sub-groups, the shared buffer's keys).

    All agents count the same restarts when every node's workers fail together, which fedhog's failure
    detection ensures; ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` with the c10d rendezvous avoids the agent's
    store altogether (rank 0 then hosts a fresh store per attempt) and needs nothing from here.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    address, port = environment.main_address, environment.main_port
    if os.environ.get("MASTER_ADDR") != address or os.environ.get("MASTER_PORT") != str(port):
        return {}  # the environment points elsewhere than the agent's store: torch creates the store itself
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(address, port, is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"fedhog/attempt{attempt}", client)}


def join_default_group(environment: ClusterEnvironment, timeout: timedelta) -> None:
    """Joins the run's default process group: gloo on every accelerator (NCCL allows one rank per GPU, and the K
    workers of a device share one); its collectives fail after ``timeout``.

    Start-up (imports, every process reaching the rendezvous) may take longer than the failure-detection timeout,
    so the rendezvous gets at least :data:`STARTUP_TIMEOUT`.
    """
    startup = max(timeout, STARTUP_TIMEOUT)
    _joining.set()
    try:
        internals.init_dist_connection(environment, "gloo", timeout=startup, **restart_safe_store(environment, startup))
    finally:
        _joining.clear()
    internals.set_default_timeout(timeout)
