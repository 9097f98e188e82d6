"""Conversion throughput of `prepare-data --source webdataset`: 256-px JPEG samples -> records.

    .venv/bin/python -m benchmarks.convert_webdataset [--images 2000] [--source_size 320]

Writes one tar of synthetic photos (smooth gradients plus noise, JPEG quality 90, at
`source_size` × 256 so that every sample is resized and centre-cropped to 256) into a
temporary directory, converts it once, and prints images per second (one process: the
converter does not yet run in parallel over shards) and the peak resident memory.
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
  parser.add_argument("--source_size", type=int, default=320, help="source width (height 256)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    write_tar(f"{tmp}/000000.tar", args.images, args.source_size, 256)
    start = time.perf_counter()
    summary = webdataset.write_webdataset(tmp, f"{tmp}/out", "train", image_size=256)
    seconds = time.perf_counter() - start
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"{summary.written} images ({args.source_size}x256 JPEG -> 256x256 records) in "
        f"{seconds:.1f} s: {summary.written / seconds:.0f} images/s on one process; "
        f"peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
  main()
