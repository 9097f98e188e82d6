"""The FAE demo (`starflow2 fae-demo`) at the tiny preset on fake Fashion-MNIST (slow)."""

import json
import os

import pytest

import fake_data
from demos import fae_demo


@pytest.mark.slow
def test_tiny_fae_demo_compares_both_latents(tmp_path):
  idx = str(tmp_path / "idx")
  fake_data.write_fake_fashion_mnist(idx, num_train=400, num_test=40, class_templates=True)
  workdir = str(tmp_path / "run")
  summary = fae_demo.run(workdir, idx, size="tiny", judge_per_class=5,
                         understanding_examples=10, test_examples=40)
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  for name in fae_demo.LATENTS:
    for key in (f"{name}_generation_accuracy", f"{name}_understanding_accuracy"):
      assert 0.0 <= written[key] <= 1.0 and written[key] == summary[key], key
  assert 0.0 < written["patch_test_pixel_bpd"] < 8.0
  assert written["fae_test_latent_bpd"] is not None
  assert -1.0 <= written["fae_feature_cosine"] <= 1.0 and written["fae_psnr"] > 0.0
  assert len(written["fae_latent_channel_std"]) == 4          # the tiny FAE's latent_dim
  for picture in ("fae_reconstructions.png", "fae_generated.png", "patch_generated.png"):
    assert os.path.exists(os.path.join(workdir, picture)), picture
