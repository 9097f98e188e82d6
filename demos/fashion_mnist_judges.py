"""The Fashion-MNIST demos' judges as evaluators (registered under `starflow2.evaluators` in
setup.py, so configs name them and the library never imports this module):

  fashion_mnist_generation     draws `per_class` images from each class's caption with the
                               configured guidance; an independent pixel classifier
                               (demos/classifier.py, fitted on the real training split)
                               scores them
  fashion_mnist_understanding  greedy answers to "what is in this picture?" about real test
                               images; the share that names the right class

Both take an explicit `seed`, so the same draws are judged after every stage that names the
same seed (paired figures).
"""

import functools
import os

import jax
import numpy as np

from data_pipelines import text as text_lib
from demos import classifier
from demos import fashion_mnist
from demos import fashion_mnist_stages as stage_records
from starflow2_jax import image_io
from starflow2_jax.sampling import prompts

GENERATION_SEED = 101


@functools.lru_cache(maxsize=4)
def fitted_judge(source_dir, judge_examples):
  """(the pixel classifier fitted on the first `judge_examples` real training images, its
  accuracy on the real test split); fitted once per process."""
  train_images, train_labels = fashion_mnist.load_idx_split(source_dir, "train")
  test_images, test_labels = fashion_mnist.load_idx_split(source_dir, "test")
  judge = classifier.fit_logistic_regression(train_images[:judge_examples],
                                             train_labels[:judge_examples], 10)
  return judge, judge.accuracy(test_images, test_labels)


def generation_accuracy(task, params, judge, per_class, rng):
  """(the judge's accuracy on `per_class` images drawn from each class's caption, them)."""
  captions = [stage_records.caption(k) for k in range(10) for _ in range(per_class)]
  labels = np.repeat(np.arange(10), per_class)
  images = task.sample_captions(params, captions, rng, task.config.sample.guidance_weight)
  return judge.accuracy(images, labels), images


def named_class(answer):
  """The class whose name the answer's words contain (longest name first), or None."""
  words = " " + " ".join(text_lib.split_words(answer)) + " "
  names = sorted(range(10), key=lambda k: -len(fashion_mnist.CLASS_NAMES[k]))
  for k in names:
    if f" {' '.join(text_lib.split_words(fashion_mnist.CLASS_NAMES[k]))} " in words:
      return k
  return None


def understanding_accuracy(task, params, images, labels, rng, batch=100):
  """(the share of greedy answers about `images` that name their class, the answers)."""
  answers = []
  for i in range(0, len(images), batch):
    answers += prompts.answer(task, params, images[i:i + batch], stage_records.QUESTION,
                              jax.random.fold_in(rng, i))
  correct = [named_class(a) == int(label) for a, label in zip(answers, labels)]
  return float(np.mean(correct)), answers


def generation(context, per_class=30, seed=GENERATION_SEED, judge_examples=20000,
               source_dir=None, grid_columns=None):
  """Evaluator `fashion_mnist_generation`: accuracy, the judge's own accuracy on real test
  images, and a PNG grid of the draws (one row per class, `grid_columns` of them)."""
  source_dir = source_dir or context.config.data.source_dir
  judge, judge_accuracy = fitted_judge(source_dir, judge_examples)
  accuracy, images = generation_accuracy(context.task, context.params, judge, per_class,
                                         jax.random.key(seed))
  grid = images.reshape((10, per_class) + images.shape[1:])[:, :grid_columns]
  path = image_io.save_png(image_io.image_grid(grid),
                           os.path.join(context.output_dir(), "generated.png"))
  return dict(accuracy=accuracy, classifier_test_accuracy=judge_accuracy,
              num_images=int(images.shape[0]), grid=path)


def understanding(context, num_examples=500, seed=102, source_dir=None):
  """Evaluator `fashion_mnist_understanding`: accuracy on the first `num_examples` real
  test images, and five example answers."""
  test_images, test_labels = fashion_mnist.load_idx_split(
      source_dir or context.config.data.source_dir, "test")
  accuracy, answers = understanding_accuracy(
      context.task, context.params, test_images[:num_examples, :, :, None],
      test_labels[:num_examples], jax.random.key(seed))
  return dict(accuracy=accuracy, num_examples=int(min(num_examples, len(test_images))),
              example_answers=[dict(label=fashion_mnist.CLASS_NAMES[int(label)], answer=a)
                               for label, a in zip(test_labels[:5], answers[:5])])
