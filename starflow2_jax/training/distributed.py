"""Several processes, one run: `jax.distributed` from flags, the config or the cluster.

One process runs per host (or per GPU). Each names the coordinator (process 0's HOST:PORT),
the number of processes and its own id (`--coordinator_address --num_processes
--process_id`, or `config.distributed`), or leaves them to a cluster environment that JAX
reads itself (SLURM or Open MPI with several tasks, a multi-host Cloud TPU slice). A process
alone initializes nothing. This must run before anything touches a device. docs/launch.md
has the command per host.

Each process then reads its rows of every global batch (`process_rows`), the trainer
assembles them into global arrays, only process 0 writes logs and files, and Orbax saves
and restores from all processes.
"""

import dataclasses
import logging
import os

import jax

AUTO = "auto"   # --coordinator_address=auto: JAX finds the cluster (Cloud TPU metadata, …)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How this process joins a run: explicit values, `AUTO`, or nothing (the environment)."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def settings(config=None, **flag_values):
  """Settings from flags (`flag_values`, None where not given) over `config.distributed`."""
  section = dict((config.get("distributed") if config is not None else None) or {})
  unknown = sorted(set(section) - {f.name for f in dataclasses.fields(Settings)})
  if unknown:
    raise ValueError(f"config.distributed has unknown keys {unknown}")
  merged = {k: v for k, v in section.items() if v not in (None, "")}
  merged.update({k: v for k, v in flag_values.items() if v not in (None, "")})
  return Settings(**merged)


def _count(environ, name):
  try:
    return int(environ.get(name) or 1)
  except ValueError:
    return 1


def cluster_from_environment(environ=None):
  """The multi-process cluster the environment describes ("slurm", "openmpi", "tpu"), or
  None: a SLURM step or Open MPI job with one task, or no cluster, is a process alone."""
  environ = os.environ if environ is None else environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")    # what JAX's SlurmCluster reads
  if all(name in environ for name in slurm) and _count(environ, "SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or _count(environ, "MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return None


def _check_explicit(s):
  if s.num_processes is None or s.process_id is None:
    raise ValueError(f"--coordinator_address {s.coordinator_address} needs --num_processes "
                     "and --process_id too")
  if not 0 <= s.process_id < s.num_processes:
    raise ValueError(f"--process_id {s.process_id} is not in [0, {s.num_processes})")
  if ":" not in s.coordinator_address:
    raise ValueError(f"--coordinator_address {s.coordinator_address!r} is not HOST:PORT")


def initialize(s=Settings(), environ=None):
  """Joins the run that `s` or the environment describes; returns how ("explicit", "auto",
  "slurm", "openmpi", "tpu"), or None for a process alone (nothing initialized).

  Explicit settings need all three values; `--num_processes 1` is a process alone. Without
  them, `AUTO` or a cluster environment (`cluster_from_environment`) hands the detection
  to `jax.distributed.initialize()`. A process already initialized (a second command in one
  script) stays as it is: "existing".
  """
  if jax.distributed.is_initialized():
    return "existing"
  if s.coordinator_address not in (None, AUTO):
    _check_explicit(s)
    if s.num_processes == 1:
      return None
    jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id)
    how = "explicit"
  else:
    if s.num_processes is not None or s.process_id is not None:
      raise ValueError("--num_processes and --process_id need --coordinator_address HOST:PORT")
    how = AUTO if s.coordinator_address == AUTO else cluster_from_environment(environ)
    if how is None:
      return None
    jax.distributed.initialize()
  logging.info("process %d of %d (%s), %d local devices of %d", jax.process_index(),
               jax.process_count(), how, jax.local_device_count(), jax.device_count())
  return how


def process_rows(batch_sharding, batch_size):
  """(start, stop): the rows of each global batch that this process supplies, where
  `jax.make_array_from_process_local_data` puts them (its devices' shards of axis 0)."""
  indices = batch_sharding.addressable_devices_indices_map((batch_size,)).values()
  spans = sorted({index[0].indices(batch_size)[:2] for index in indices})
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(f"this process's rows of a batch of {batch_size} are not contiguous "
                       f"({spans}): order the mesh's devices by process")
  return spans[0][0], spans[-1][1]
