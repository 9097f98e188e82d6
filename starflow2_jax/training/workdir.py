"""Using a trained workdir: evaluators at a checkpoint, images for captions and prompts."""

import json
import os

import jax

from starflow2_jax import image_io
from starflow2_jax import sharding
from starflow2_jax.evaluation import evaluators
from starflow2_jax.sampling import prompts
from starflow2_jax.training import data as data_lib
from starflow2_jax.training import metrics as metrics_lib
from starflow2_jax.training import trainer


def evaluate_workdir(config, workdir, names=None, step=None):
  """Runs evaluators (`names`, a list or "a,b"; default: those in `config.evals`) on the
  latest (or given) checkpoint of a training workdir. Their numbers go to the workdir's
  TensorBoard at the checkpoint's step, and every result to `evals` in its summary.json
  (merged with what is there). Returns {name: result} with the step."""
  task, params, step = trainer.restore_params(config, workdir, step)
  mesh, rules = sharding.mesh_and_rules(config.mesh)
  data_dir = data_lib.records_dir(config, workdir)
  entries = evaluators.select(config, names)
  writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"))
  with jax.set_mesh(mesh):        # held_out_metrics applies the logical axis rules itself
    held_out = trainer.held_out_metrics_fn(config, task, jax.jit(task.eval_metrics), params,
                                           data_dir, mesh, rules)
    context = evaluators.EvalContext(config, task, params, step, workdir, data_dir, held_out)
    results = evaluators.run(entries, context, writer)
  writer.close()
  _merge_into_summary(workdir, step, results)
  return dict(results, step=step)


def _merge_into_summary(workdir, step, results):
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "summary.json")
  summary = {}
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
  summary.setdefault("evals", {}).update(results)
  summary["evals_step"] = step
  with open(path + ".partial", "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(path + ".partial", path)


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
