"""Parity of the Flax Qwen2.5-VL with the transformers reference (float32, max abs <= 1e-4).

One tiny random `Qwen2_5_VLForConditionalGeneration` is built, saved with `save_pretrained`
and imported by `convert.qwen`; every test compares against the PyTorch model itself.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from data_pipelines import mrope_positions as positions_lib  # noqa: E402
from starflow2_jax.convert import qwen as qwen_convert  # noqa: E402
from starflow2_jax.models.qwen2_5_vl import config as config_lib  # noqa: E402
from starflow2_jax.models.qwen2_5_vl import generate as generate_lib  # noqa: E402
from starflow2_jax.models.qwen2_5_vl import model as model_lib  # noqa: E402
from starflow2_jax.models.qwen2_5_vl import vision as vision_lib  # noqa: E402

try:
  from tests import qwen_helpers as qh
except ImportError:
  import qwen_helpers as qh

TOL = 1e-4


def _assert_close(what, got, want):
  """Max abs difference <= TOL; the figure is printed (see it with `pytest -s`)."""
  diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
  print(f"\nparity {what}: max abs diff {diff:.2e} (scale {np.abs(want).max():.2f})")
  assert diff <= TOL, f"{what}: {diff} > {TOL}"


@pytest.fixture(scope="module", name="ref")
def _reference(tmp_path_factory):
  directory = tmp_path_factory.mktemp("qwen_ref")
  hf = qh.build_reference(directory)
  config = config_lib.from_pretrained_dir(directory)
  model = model_lib.Qwen25VL(config)
  params = qwen_convert.load_hf_checkpoint(directory)
  apply = jax.jit(lambda ids, pos, valid, patches, grid: model.apply(
      {"params": params}, ids, pos, valid, patches, grid)[0])
  return dict(dir=directory, hf=hf, config=config, model=model, params=params, apply=apply)


def _hf_logits(hf, ids, valid=None, patches=None, grids=None, config=None):
  kwargs = dict(input_ids=torch.tensor(ids, dtype=torch.long))
  if valid is not None:
    kwargs["attention_mask"] = torch.tensor(valid, dtype=torch.long)
  if patches is not None:
    kwargs.update(pixel_values=torch.tensor(patches), image_grid_thw=torch.tensor(grids),
                  mm_token_type_ids=torch.tensor(qh.mm_token_type_ids(ids, config)))
  with torch.no_grad():
    return hf(**kwargs).logits.numpy()


def _two_image_prompt(config):
  ids = ([11, 12, 13] + qh.image_span(config, qh.GRIDS[0]) + [14, 15] +
         qh.image_span(config, qh.GRIDS[1]) + [16, 17, 18])
  return ids, qh.random_patches(qh.GRIDS, config)


def test_config_reads_saved_and_flat_hub_layouts(ref):
  config = ref["config"]
  assert config.text == qh.tiny_config().text and config.vision == qh.tiny_config().vision
  nested = json.loads((ref["dir"] / "config.json").read_text())
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  flat.update({k: v for k, v in nested["text_config"].items() if k != "model_type"})
  flat["rope_scaling"] = flat.pop("rope_parameters")
  assert config_lib.from_hf_dict(flat).text == config.text


def test_text_only_logits(ref):
  config = ref["config"]
  ids = np.random.RandomState(0).randint(0, 240, (2, 13)).astype(np.int32)
  valid = np.ones(ids.shape, bool)
  pos, _ = positions_lib.rope_index(ids, valid, None, config.image_token_id, 2)
  got = np.asarray(ref["apply"](ids, pos, valid, None, None))
  want = _hf_logits(ref["hf"], ids)
  assert np.abs(want).max() > 0.5                  # a meaningful scale for the tolerance
  _assert_close("text-only logits", got, want)


def test_vision_tower_features(ref):
  config = ref["config"]
  patches = np.concatenate(qh.random_patches(qh.GRIDS, config, seed=3))
  grid = vision_lib.grid_inputs(qh.GRIDS, config.vision)
  got = np.asarray(ref["model"].apply({"params": ref["params"]}, patches, grid,
                                      method="encode_images"))
  with torch.no_grad():
    want = ref["hf"].model.visual(torch.tensor(patches),
                                  grid_thw=torch.tensor(qh.GRIDS)).pooler_output.numpy()
  assert got.shape == want.shape == (30, config.text.hidden_size)
  _assert_close("vision features", got, want)


def test_rope_index_matches_reference(ref):
  config = ref["config"]
  ids, _ = _two_image_prompt(config)
  first = ids[:3 + len(qh.image_span(config, qh.GRIDS[0])) + 2]   # text, one image, text
  pad = len(ids) - len(first)
  ids = np.array([ids, [config.pad_token_id] * pad + first])
  valid = np.ones(ids.shape, bool)
  valid[1, :pad] = False
  grids = np.array(qh.GRIDS + qh.GRIDS[:1])
  pos, delta = positions_lib.rope_index(ids, valid, grids, config.image_token_id, 2)
  want_pos, want_delta = ref["hf"].model.get_rope_index(
      torch.tensor(ids), torch.tensor(qh.mm_token_type_ids(ids, config)), torch.tensor(grids),
      attention_mask=torch.tensor(valid.astype(np.int64)))
  np.testing.assert_array_equal(pos, want_pos.numpy())
  np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])


def test_text_with_two_images_logits(ref):
  config = ref["config"]
  ids, patches = _two_image_prompt(config)
  prompt = generate_lib.make_prompt_batch([ids], config, list(zip(patches, qh.GRIDS)))
  got = np.asarray(ref["apply"](prompt.ids_bt, prompt.positions_3bt, prompt.valid_bt,
                                prompt.patches_np, prompt.grid))
  want = _hf_logits(ref["hf"], prompt.ids_bt, patches=prompt.patches_np, grids=qh.GRIDS,
                    config=config)
  _assert_close("two-image logits", got, want)


def test_left_padded_batch_logits(ref):
  config = ref["config"]
  ids, patches = _two_image_prompt(config)
  text_row = [21, 22, 23, 24, 25, 26, 27]
  prompt = generate_lib.make_prompt_batch([ids, text_row], config,
                                          list(zip(patches, qh.GRIDS)))
  assert not prompt.valid_bt[1, 0]                 # row 1 is left-padded
  got = np.asarray(ref["apply"](prompt.ids_bt, prompt.positions_3bt, prompt.valid_bt,
                                prompt.patches_np, prompt.grid))
  want = _hf_logits(ref["hf"], prompt.ids_bt, prompt.valid_bt, prompt.patches_np, qh.GRIDS,
                    config)
  _assert_close("left-padded batch logits", got[prompt.valid_bt], want[prompt.valid_bt])


def test_greedy_generation_matches_reference_and_full_recompute(ref):
  config, hf = ref["config"], ref["hf"]
  ids, patches = _two_image_prompt(config)
  images = list(zip(patches, qh.GRIDS))
  prompt = generate_lib.make_prompt_batch([ids], config, images)
  sampling = generate_lib.SamplingConfig(max_new_tokens=16, greedy=True,
                                         pad_token_id=config.pad_token_id)
  out = generate_lib.generate(ref["model"], ref["params"], prompt, sampling, return_logits=True)
  with torch.no_grad():
    want = hf.generate(
        input_ids=torch.tensor(prompt.ids_bt, dtype=torch.long),
        attention_mask=torch.ones(prompt.ids_bt.shape, dtype=torch.long),
        pixel_values=torch.tensor(prompt.patches_np), image_grid_thw=torch.tensor(qh.GRIDS),
        mm_token_type_ids=torch.tensor(qh.mm_token_type_ids(prompt.ids_bt, config)),
        max_new_tokens=16, do_sample=False, eos_token_id=None,
        pad_token_id=config.pad_token_id)[0, len(ids):].numpy()
  np.testing.assert_array_equal(out.tokens[0], want)
  # Cached-decode logits against one full pass over prompt + answer.
  full = generate_lib.make_prompt_batch([ids + list(out.tokens[0])], config, images)
  full_logits = np.asarray(ref["apply"](full.ids_bt, full.positions_3bt, full.valid_bt,
                                        full.patches_np, full.grid))
  recomputed = full_logits[:, len(ids) - 1:-1]
  _assert_close("cached decode vs full recompute", out.logits, recomputed)
