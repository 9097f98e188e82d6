"""Conversion throughput of `prepare-data --source webdataset`: 256-px JPEG samples -> records.

    .venv/bin/python -m benchmarks.convert_webdataset [--images 2000] [--shards 4]
        [--workers 1] [--source_size 320]

Writes `shards` tars of synthetic photos (smooth gradients plus noise, JPEG quality 90, at
`source_size` × 256 so that every sample is resized and centre-cropped to 256) into a
temporary directory, converts them once with `workers` processes, and prints images per
second, per worker, and the peak resident memory of this process and of a worker.
"""

import argparse
import io
import resource
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from data_pipelines import webdataset


def _photo(rng, width, height):
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
  noise = rng.integers(0, 40, (height, width, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_tar(path, num_images, width, height):
  rng = np.random.default_rng(0)
  photos = [_photo(rng, width, height) for _ in range(16)]   # re-used: encoding is not timed
  with tarfile.open(path, "w") as tar:
    for i in range(num_images):
      buffer = io.BytesIO()
      Image.fromarray(photos[i % 16]).save(buffer, format="JPEG", quality=90)
      for name, data in ((f"{i:06d}.jpg", buffer.getvalue()),
                         (f"{i:06d}.txt", f"a photo number {i}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--shards", type=int, default=4, help="tars the images are split into")
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--source_size", type=int, default=320, help="source width (height 256)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    for k in range(args.shards):
      count = args.images // args.shards + (k < args.images % args.shards)
      write_tar(f"{tmp}/{k:06d}.tar", count, args.source_size, 256)
    start = time.perf_counter()
    summary = webdataset.write_webdataset(tmp, f"{tmp}/out", "train", image_size=256,
                                          workers=args.workers)
    seconds = time.perf_counter() - start
  peak = lambda who: resource.getrusage(who).ru_maxrss / 1024
  rate = summary.written / seconds
  print(f"{summary.written} images ({args.source_size}x256 JPEG -> 256x256 records) in "
        f"{seconds:.1f} s: {rate:.0f} images/s with {args.workers} worker(s), "
        f"{rate / args.workers:.0f} per worker; peak RSS {peak(resource.RUSAGE_SELF):.0f} MiB "
        f"(this process), {peak(resource.RUSAGE_CHILDREN):.0f} MiB (largest worker)")


if __name__ == "__main__":
  main()
