"""`bpd`: the task's held-out metrics (bits/dim, NLL, …) on any records split."""


def evaluate(context, split=None, num_examples=None):
  """Averages the task's eval metrics over the first `num_examples` (default
  `config.eval.num_examples`) examples of `split` (default `config.data.test_split`)."""
  result = dict(context.held_out_metrics(split=split, num_examples=num_examples))
  result["num_examples"] = int(num_examples or context.config.eval.num_examples)
  result["split"] = split or context.config.data.test_split
  return result
