"""`starflow2 precompute-latents`: each image's latent (and, if asked, its features)
computed once and stored in the records, so that training does not run DINOv2 and the FAE
encoder at every step.

The output split has the input's records in the same order and the same shard count (each
image segment gains `arrays["latent"]` [N, D], and `arrays["features"]` [N, F] with
`features=True`); a stage reads it with `data.precomputed_latents=True`. Records stream
through in batches, so memory stays flat in the dataset's size.
"""

import logging

import jax
import numpy as np
import tqdm
from array_record.python import array_record_module

from data_pipelines import records as records_lib
from data_pipelines import writers

_READ_CHUNK = 256


def read_split(data_dir, split):
  """(number of shards, the split's records in the order `writers.write_records` wrote
  them: round-robin over the shards), decoded lazily."""
  paths = writers.find_split_files(data_dir, split)
  readers = [array_record_module.ArrayRecordReader(p) for p in paths]
  counts = [r.num_records() for r in readers]

  def generate():
    try:
      for start in range(0, max(counts, default=0), _READ_CHUNK):
        chunks = [r.read(start, min(start + _READ_CHUNK, n)) if start < n else []
                  for r, n in zip(readers, counts)]
        for k in range(max(len(c) for c in chunks)):
          for chunk in chunks:
            if k < len(chunk):
              yield records_lib.decode_record(chunk[k])
    finally:
      for r in readers:
        r.close()

  return len(paths), sum(counts), generate()


def _image_arrays(latent, features):
  """fn(uint8 images [B, H, W, C]) -> {name: float32 numpy [B, ...]}, jitted."""
  def compute(images):
    out = {"latent": latent.encode(images)}
    if features:
      out["features"] = latent.dinov2.features(images)
    return out
  return jax.jit(compute)


def with_latents(records, latent, batch_size=64, features=False):
  """Streams `records`, each image segment with its latent (and features) attached."""
  compute = _image_arrays(latent, features)
  pending, images = [], []

  def flush():
    arrays = {}
    if images:
      batch = np.stack(images)
      padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:],
                                                 batch.dtype)])   # one compiled shape
      arrays = {k: np.asarray(v)[:len(batch)] for k, v in compute(padded).items()}
    k = 0
    for record in pending:
      segments = []
      for segment in record.segments:
        if isinstance(segment, records_lib.ImageSegment):
          segment = segment.with_arrays(**{name: a[k] for name, a in arrays.items()})
          k += 1
        segments.append(segment)
      yield records_lib.InterleavedRecord(segments, record.meta)
    pending.clear()
    images.clear()

  for record in records:
    record_images = [s.to_array() for s in record.segments
                     if isinstance(s, records_lib.ImageSegment)]
    if images and len(images) + len(record_images) > batch_size:
      yield from flush()
    if len(record_images) > batch_size:
      raise ValueError(f"a record holds {len(record_images)} images, more than the batch of "
                       f"{batch_size}: raise batch_size")
    pending.append(record)
    images.extend(record_images)
  yield from flush()


def precompute_split(latent, in_dir, out_dir, split, batch_size=64, features=False):
  """Writes `split` of `in_dir` to `out_dir` with latents attached; returns the summary."""
  num_shards, total, records = read_split(in_dir, split)
  summary = writers.WriteSummary()
  progress = tqdm.tqdm(with_latents(records, latent, batch_size, features), total=total,
                       desc=f"latents of {split}", unit="record", mininterval=5.0)

  def counted():
    for record in progress:
      summary.written += 1
      yield record

  summary.files = writers.write_records(counted(), out_dir, split, num_shards)
  writers.save_summary(summary, out_dir, split)
  logging.info("%s: %d records with latents in %s", split, summary.written, out_dir)
  return summary
