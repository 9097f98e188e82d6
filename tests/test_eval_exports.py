"""The benchmark exports (evaluation/exports.py): GenEval's folders and DPG-Bench's grids,
file by file as the official scorers read them, holding exactly the images the sampler drew
for each prompt at the configured guidance (the tiny model with random parameters)."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from starflow2_jax.evaluation import evaluators
from starflow2_jax.evaluation import exports
from starflow2_jax.sampling import prompts
from test_eval_mcq_tsv import context_for, tiny_task

GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], '
    '"prompt": "a shirt"}',
    '{"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "dog", '
    '"count": 1}], "prompt": "a shoe"}',
]


@pytest.fixture(scope="module")
def model():
  """The tiny task with random parameters, built once for the module."""
  task = tiny_task()
  return task, jax.jit(task.init_params)(jax.random.key(0))


@pytest.fixture
def context(model, tmp_path):
  return context_for(*model, tmp_path / "workdir", name="benchmark")


@pytest.fixture
def drawn(monkeypatch):
  """Records each call of `prompts.draw_captions` (captions, weight, the images it returned)."""
  calls, real = [], prompts.draw_captions

  def spy(task, params, captions, rng, guidance_weight=None):
    images = real(task, params, captions, rng, guidance_weight)
    calls.append((list(captions), guidance_weight, images))
    return images
  monkeypatch.setattr(prompts, "draw_captions", spy)
  return calls


def png(path):
  with Image.open(path) as image:
    return image.mode, np.asarray(image)


def write_metadata(tmp_path, lines):
  path = tmp_path / "evaluation_metadata.jsonl"
  path.write_text("\n".join(lines) + "\n\n")       # a trailing blank line is no prompt
  return str(path)


def test_geneval_folders_hold_the_drawn_images(context, drawn, tmp_path):
  out = context.output_dir()
  os.makedirs(os.path.join(out, "00009", "samples"))       # a previous, longer run's folder
  result = exports.geneval_export(context, metadata=write_metadata(tmp_path, GENEVAL_LINES),
                                  num_images=2, batch_size=4)
  assert result == dict(num_prompts=2, num_images=4, images_per_prompt=2, path=out)
  assert sorted(os.listdir(out)) == ["00000", "00001"]
  # One sampler batch: each prompt twice, at the config's guidance weight.
  [(captions, weight, images)] = drawn
  assert captions == ["a shirt", "a shirt", "a shoe", "a shoe"]
  assert weight == context.config.sample.guidance_weight == 2.0
  h, w, c = context.task.layout.image_shape
  assert images.shape == (4, h, w, c) and len({a.tobytes() for a in images}) == 4
  for index, line in enumerate(GENEVAL_LINES):
    folder = os.path.join(out, f"{index:05d}")
    assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
    with open(os.path.join(folder, "metadata.jsonl")) as f:
      text = f.read()
    assert text.strip() == line and json.loads(text) == json.loads(line)
    assert sorted(os.listdir(os.path.join(folder, "samples"))) == ["00000.png", "00001.png"]
    for k in range(2):
      mode, pixels = png(os.path.join(folder, "samples", f"{k:05d}.png"))
      assert mode == "RGB" and pixels.shape == (h, w, 3)
      np.testing.assert_array_equal(pixels, np.repeat(images[2 * index + k], 3, axis=-1))


def test_dpg_grids_are_cut_where_the_scorer_crops(context, drawn, tmp_path):
  prompt_dir = tmp_path / "prompts"
  prompt_dir.mkdir()
  (prompt_dir / "b_second.txt").write_text("a coat\n")
  (prompt_dir / "a_first.txt").write_text("a bag\n")
  (prompt_dir / "notes.md").write_text("not a prompt")
  result = exports.dpg_export(context, prompt_dir=str(prompt_dir), limit=1, batch_size=4)
  out = context.output_dir()
  h = context.task.layout.image_shape[0]
  assert result == dict(num_prompts=1, num_images=4, images_per_prompt=4, resolution=h,
                        path=out)
  assert os.listdir(out) == ["a_first.png"]
  [(captions, weight, images)] = drawn
  assert captions == ["a bag"] * 4 and weight == 2.0
  mode, grid = png(os.path.join(out, "a_first.png"))
  assert mode == "RGB" and grid.shape == (2 * h, 2 * h, 3)
  # compute_dpg_bench.py's crop boxes (left, top, right, bottom) for --resolution h, in order.
  boxes = [(0, 0, h, h), (h, 0, 2 * h, h), (0, h, h, 2 * h), (h, h, 2 * h, 2 * h)]
  for (left, top, right, bottom), image in zip(boxes, images):
    np.testing.assert_array_equal(grid[top:bottom, left:right], np.repeat(image, 3, axis=-1))
  assert len({image.tobytes() for image in images}) == 4


def test_dpg_grid_shapes():
  images = np.arange(4 * 2 * 3 * 1, dtype=np.uint8).reshape(4, 2, 3, 1) * 5
  for n, shape in ((1, (2, 3)), (2, (2, 6)), (3, (4, 6)), (4, (4, 6))):
    grid = exports.dpg_grid(images[:n])
    assert grid.shape == shape + (1,)
    for k in range(n):
      row, col = divmod(k, 2)
      np.testing.assert_array_equal(grid[2 * row:2 * row + 2, 3 * col:3 * col + 3], images[k])
  assert not exports.dpg_grid(images[:3])[2:, 3:].any()        # the missing fourth cell
  with pytest.raises(ValueError, match="1 to 4"):
    exports.dpg_grid(images[[0, 1, 2, 3, 0]])


def test_options_and_errors_before_drawing(context, tmp_path, monkeypatch):
  """A stubbed sampler: the registry runs the export under the entry's name, the options
  reach the sampler, and bad input fails before anything is drawn."""
  calls = []
  shape = context.task.layout.image_shape

  def stub(task, params, captions, rng, guidance_weight=None):
    calls.append(guidance_weight)
    return np.zeros((len(captions),) + tuple(shape), np.uint8)
  monkeypatch.setattr(prompts, "draw_captions", stub)
  metadata = write_metadata(tmp_path, GENEVAL_LINES)
  entry = dict(type="geneval_export", every=0, metadata=metadata, num_images=1,
               guidance_weight=0)
  result = evaluators.run({"geneval": entry}, context)["geneval"]
  assert result["path"] == os.path.join(context.workdir, "eval", "geneval", "step_0000003")
  assert sorted(os.listdir(result["path"])) == ["00000", "00001"]
  exports.geneval_export(context, metadata=metadata, num_images=3, guidance_weight=1.5,
                         batch_size=4, limit=1)
  assert calls == [None, 1.5]          # weight 0 draws unguided; 3 images fit one batch

  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    exports.geneval_export(context, metadata=str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(GENEVAL_LINES[0] + '\n{"tag": "no prompt"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    exports.geneval_export(context, metadata=str(bad))
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"prompt": "a " * 200}) + "\n")
  with pytest.raises(ValueError, match="prompt 00000 .* positions"):
    exports.geneval_export(context, metadata=str(long))
  with pytest.raises(ValueError, match="at least 1"):
    exports.geneval_export(context, metadata=metadata, num_images=0)
  with pytest.raises(FileNotFoundError, match="no_prompts"):
    exports.dpg_export(context, prompt_dir=str(tmp_path / "no_prompts"))
  with pytest.raises(ValueError, match="1 to 4"):
    exports.dpg_export(context, prompt_dir=str(tmp_path), num_images=5)
  assert calls == [None, 1.5]
