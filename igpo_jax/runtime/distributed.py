"""Multi-process start-up (`jax.distributed`) and host-local → global batches.

One process per host (TPU VM, or GPU node) or per GPU; every process runs the same program. Call
`initialize()` first thing in `main`, before anything touches a JAX device. Where the process
group comes from, in order:
  1. explicit arguments (all of coordinator_address, num_processes, process_id);
  2. SLURM (`srun`): SLURM_NTASKS, SLURM_PROCID, first host of SLURM_STEP_NODELIST + a port;
  3. a multi-host TPU VM slice (TPU_WORKER_HOSTNAMES lists > 1 host): JAX finds the rest itself;
  4. otherwise a single process: nothing to do.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Default coordinator port under SLURM when IGPO_COORDINATOR_PORT is unset: offset by the job id so
# that two jobs sharing a first node do not collide.
_SLURM_BASE_PORT = 12000


class DistributedConfigError(ValueError):
    """The process-group settings are missing, inconsistent or malformed."""


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[007-010,12],cpu1' → 'gpu007'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise DistributedConfigError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # keeps zero padding ('007')


def _from_slurm(env: Mapping[str, str]) -> tuple[str, int, int] | None:
    if "SLURM_NTASKS" not in env or "SLURM_PROCID" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedConfigError("SLURM_NTASKS is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is")
    port = int(env.get("IGPO_COORDINATOR_PORT") or _SLURM_BASE_PORT + int(env.get("SLURM_JOB_ID", "0")) % 4000)
    return f"{first_slurm_host(nodelist)}:{port}", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])


def _tpu_hosts(env: Mapping[str, str]) -> int:
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()])


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The `jax.distributed.initialize` arguments for this process, {} for "let JAX detect it"
    (multi-host TPU VM), or None for a single process. Pure (reads `env`, default os.environ)."""
    env = os.environ if env is None else env
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        if num_processes == 1 and process_id in (None, 0):
            return None
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise DistributedConfigError(f"multi-process start needs coordinator_address, num_processes and "
                                         f"process_id together; missing: {', '.join(missing)}")
        source = "arguments"
    else:
        found = _from_slurm(env)
        if found is None:
            return {} if _tpu_hosts(env) > 1 else None
        coordinator_address, num_processes, process_id = found
        source = "SLURM environment"
        if num_processes == 1:
            return None
    if num_processes < 1:
        raise DistributedConfigError(f"num_processes={num_processes} (from {source}) must be ≥ 1")
    if not 0 <= process_id < num_processes:
        raise DistributedConfigError(f"process_id={process_id} (from {source}) is outside [0, {num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"coordinator_address={coordinator_address!r} (from {source}) is not HOST:PORT")
    return {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None) -> bool:
    """Join the process group (see the module docstring); returns True when running multi-process.

    Idempotent: a second call after a successful one does nothing.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs = resolve(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return False
    # CPU processes exchange collectives through gloo (the default in recent JAX; explicit here
    # because without it a multi-process CPU run has no cross-process collectives at all).
    # It only concerns the CPU client, so setting it on GPU/TPU hosts is harmless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    return True


def host_local_batch_to_global(array_local, mesh: Mesh, spec: PartitionSpec):
    """A global jax.Array (or pytree of them) from each process's rows of the batch.

    Every process passes the slice of the global array that its own devices hold under `spec`
    (e.g. its 1/P share of the rows when the batch axis spans all processes, or the whole batch
    when its devices cover every batch shard). With one process this is a plain device_put.
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), array_local)


def process_rows(mesh: Mesh, spec: PartitionSpec, global_shape: Sequence[int]) -> slice:
    """The contiguous range of axis-0 indices this process's devices hold under `spec`: what to
    pass to `host_local_batch_to_global` when every process can see the whole batch."""
    index_map = NamedSharding(mesh, spec).addressable_devices_indices_map(tuple(global_shape))
    starts, stops = [], []
    for index in index_map.values():
        s = index[0] if index else slice(None)
        starts.append(0 if s.start is None else s.start)
        stops.append(global_shape[0] if s.stop is None else s.stop)
    return slice(min(starts), max(stops))


# ----------------------------------------------------------------------------- per-process work
# Rollout and search run on each process independently (its own rows, its own number of decode
# calls), so they must not touch devices of other processes: they use the process-local sub-mesh
# and a local copy of the params. Only the update runs on the global mesh, in lockstep.

def process_local_mesh(mesh: Mesh) -> Mesh:
    """The block of `mesh` made of this process's devices, with the same axis names (an axis that
    spans processes keeps only this process's share). The mesh itself when it is all local."""
    me = jax.process_index()
    mine = np.vectorize(lambda d: d.process_index == me)(mesh.devices)
    coords = [np.unique(c) for c in np.nonzero(mine)]
    block = mesh.devices[np.ix_(*coords)]
    if block.size != int(mine.sum()) or any(d.process_index != me for d in block.flat):
        raise ValueError(f"the devices of process {me} do not form a rectangular block of the mesh "
                         f"{dict(mesh.shape)}; order the mesh axes so that each host's devices are contiguous")
    if block.size == mesh.devices.size:
        return mesh
    return Mesh(block, mesh.axis_names, axis_types=mesh.axis_types)


def _local_spec(spec: PartitionSpec, mesh: Mesh, local: Mesh) -> PartitionSpec:
    """`spec` without the mesh axes that span processes (along which this process holds a part)."""
    whole = lambda axis: local.shape[axis] == mesh.shape[axis]

    def keep(entry):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in names if whole(a))
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return PartitionSpec(*(keep(e) for e in spec))


def process_local_copy(tree, mesh: Mesh, local: Mesh):
    """Each global array of `tree` (sharded over `mesh`) as an array on this process's `local` mesh
    holding the whole value. Arrays sharded only along process-local mesh axes are viewed without a
    copy (their local shards already make up the whole value); the others are first all-gathered
    along the axes that span processes — a collective: every process must call this together."""
    if local is mesh:
        return tree

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        sharding = x.sharding
        if not isinstance(sharding, NamedSharding) or sharding.mesh.devices.shape != mesh.devices.shape:
            if not x.is_fully_addressable:
                raise ValueError(f"cannot make a process-local copy of an array sharded as {sharding}")
            return jax.device_put(x, NamedSharding(local, PartitionSpec()))
        spec = _local_spec(sharding.spec, mesh, local)
        if spec != sharding.spec:
            x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, spec))(x)
        target = NamedSharding(local, spec)
        by_device = {s.device: s.data for s in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(x.shape, target,
                                                        [by_device[d] for d in target.addressable_devices])

    return jax.tree.map(one, tree)


def process_share(num_items: int, num_processes: int | None = None, process_id: int | None = None) -> slice:
    """Process `process_id`'s contiguous share of `num_items` (shares differ by at most one)."""
    num_processes = jax.process_count() if num_processes is None else num_processes
    process_id = jax.process_index() if process_id is None else process_id
    bounds = np.linspace(0, num_items, num_processes + 1).round().astype(int)
    return slice(int(bounds[process_id]), int(bounds[process_id + 1]))


def allgather_max(value: int) -> int:
    """The largest `value` over all processes (e.g. a common padded length)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a list of one without peers).
    For small host-side values: metrics, evaluation records."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    width = allgather_max(len(data))  # process_allgather needs one shape everywhere
    padded = np.zeros(width, np.uint8)
    padded[:len(data)] = data
    lengths = multihost_utils.process_allgather(np.asarray(len(data), np.int64))
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, lengths)]


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
