"""Using a trained workdir: held-out bits/dim and images for captions."""

import os

import jax

from starflow2_jax import image_io
from starflow2_jax import sharding
from starflow2_jax.sampling import prompts
from starflow2_jax.training import data as data_lib
from starflow2_jax.training import trainer


def evaluate_workdir(config, workdir):
  """The task's held-out metrics (e.g. pixel bits/dim) at the latest checkpoint."""
  task, params, step = trainer.restore_params(config, workdir)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  data_dir = data_lib.records_dir(config, workdir)
  with jax.set_mesh(mesh):
    result = trainer.evaluate(jax.jit(task.eval_metrics), params,
                              data_lib.eval_batches(config, task, data_dir), mesh, rules,
                              config.seed)
  return dict(result, step=step, num_examples=config.eval.num_examples)


def sample_workdir(config, workdir, captions=None, num_per_caption=4, guidance_weight=None,
                   out=None):
  """Writes a PNG grid, one row per caption (default: the config's `sample.captions`)."""
  task, params, step = trainer.restore_params(config, workdir)
  captions = list(captions or config.sample.captions)
  weight = config.sample.guidance_weight if guidance_weight is None else guidance_weight
  images = task.sample_captions(params, [c for c in captions for _ in range(num_per_caption)],
                                jax.random.key(config.seed + 4), weight or None)
  grid = image_io.image_grid(images.reshape(len(captions), num_per_caption, *images.shape[1:]))
  return image_io.save_png(grid, out or os.path.join(workdir, f"samples_step_{step}.png"))


def sample_prompts_workdir(config, workdir, prompt_texts, out=None, guidance_weight=None,
                           max_new=None):
  """Continues each prompt (`sampling.prompts.parse_prompt` syntax) with a trained Pretzel
  workdir; writes `<out>/index.html` with the images. Returns (results, page path)."""
  task, params, step = trainer.restore_params(config, workdir)
  overrides = {}
  if guidance_weight is not None:
    overrides["guidance_weight"] = guidance_weight or None
  if max_new is not None:
    overrides["max_new"] = max_new
  parsed = [prompts.parse_prompt(p, task.layout.image_shape) for p in prompt_texts]
  results = prompts.generator_for(task, **overrides).generate(params, parsed,
                                                               jax.random.key(config.seed + 4))
  out = out or os.path.join(workdir, f"samples_step_{step}")
  return results, prompts.write_html(results, out, f"STARFlow2 samples, step {step}")
