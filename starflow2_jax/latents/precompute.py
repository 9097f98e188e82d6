"""`starflow2 precompute-latents`: each image's latent (and, if asked, its features)
computed once and stored in the records, so that training does not run DINOv2 and the FAE
encoder at every step.

The output split has the input's records in the same shards in the same order (each
image segment gains `arrays["latent"]` [N, D], and `arrays["features"]` [N, F] with
`features=True`); a stage reads it with `data.precomputed_latents=True`. Records stream
through in batches, so memory stays flat in the dataset's size.
"""

import logging
import os

import jax
import numpy as np
import tqdm
from array_record.python import array_record_module

from data_pipelines import records as records_lib
from data_pipelines import writers

_READ_CHUNK = 256


def read_split(data_dir, split):
  """(number of shards, number of records, the split's records shard by shard, each shard
  in its stored order), decoded lazily."""
  paths = writers.find_split_files(data_dir, split)
  counts = [_count(p) for p in paths]

  def generate():
    for path in paths:
      yield from read_shard(path)

  return len(paths), sum(counts), generate()


def _count(path):
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def read_shard(path):
  """The records of one ArrayRecord shard in stored order, decoded lazily."""
  reader = array_record_module.ArrayRecordReader(path)
  try:
    count = reader.num_records()
    for start in range(0, count, _READ_CHUNK):
      for data in reader.read(start, min(start + _READ_CHUNK, count)):
        yield records_lib.decode_record(data)
  finally:
    reader.close()


def _image_arrays(latent, features):
  """fn(uint8 images [B, H, W, C]) -> {name: float32 numpy [B, ...]}, jitted."""
  def compute(images):
    out = {"latent": latent.encode(images)}
    if features:
      out["features"] = latent.dinov2.features(images)
    return out
  return jax.jit(compute)


def with_latents(records, latent, batch_size=64, features=False, compute=None):
  """Streams `records`, each image segment with its latent (and features) attached.
  `compute`: an `_image_arrays` function to reuse (one compilation for many calls)."""
  compute = compute or _image_arrays(latent, features)
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
  """Writes `split` of `in_dir` to `out_dir` with latents attached, shard i from shard i;
  returns the summary."""
  paths = writers.find_split_files(in_dir, split)
  compute = _image_arrays(latent, features)
  summary = writers.WriteSummary(files=[os.path.basename(p) for p in paths])
  progress = tqdm.tqdm(total=sum(_count(p) for p in paths), desc=f"latents of {split}",
                       unit="record", mininterval=5.0)
  os.makedirs(out_dir, exist_ok=True)
  for path in paths:
    stream = with_latents(read_shard(path), latent, batch_size, features, compute)
    summary.written += writers.write_shard(
        (progress.update(1) or record for record in stream),
        os.path.join(out_dir, os.path.basename(path)))
  progress.close()
  writers.remove_other_shards(out_dir, split, paths)
  writers.save_summary(summary, out_dir, split)
  logging.info("%s: %d records with latents in %s", split, summary.written, out_dir)
  return summary
