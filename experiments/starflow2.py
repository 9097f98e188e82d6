"""STARFlow2's stages at every size, from one config: `experiments/starflow2.py:stage=S,size=Z`.

    starflow2 train --config experiments/starflow2.py:stage=1,size=demo --workdir runs/s1 \\
        --config.init.from_workdir=runs/s0
    starflow2 plan --config experiments/starflow2.py:stage=3,size=paper --devices 64

Sizes differ only in numbers (SIZES, DATA and STAGES below):
  tiny   the tests' model, on the Fashion-MNIST stage records (seconds per run)
  demo   the pipeline demo's (`starflow2 demo`, ~19 min on 2 CPU cores; stage 0 pretrains its
         tiny VLM on the demo's sentences, since no pretrained VLM can be downloaded here)
  1b     Qwen2.5-VL-3B's text decoder frozen, a ~1B-parameter flow: 256-px images, precomputed
         FAE latents (16 × 16 × 32), Qwen's tokenizer, records from `prepare-data`
  paper  SPEC §7: Qwen2.5-VL-7B's text decoder frozen in bf16, deep stream 24 × 3072, 2
         shallow blocks × 4 layers, global batch 1024 — trainable ≈ 3.7B, total ≈ 11.4B
         (docs/pretzel.md says where they differ from the paper's 3.6B / 10.6B)
Stages (SPEC §6): 1 caption → image (flow and shallow blocks learn), 2 image → answer (the
adapter learns), 3 the weighted mixture with the vertical skips; 0 (tiny and demo only)
pretrains the demo's VLM. The 1b and paper sizes need `data.dir` (records with latents),
`data.tokenizer_json` (a converted Qwen checkpoint's) and `init.vlm_checkpoint`.
"""

import ml_collections

from data_pipelines import text
from demos import fashion_mnist_stages as fm_records
from starflow2_jax import sharding
from starflow2_jax.models import stages

SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
FASHION_MNIST_TOKENIZER = text.WordTokenizer(fm_records.WORDS, SPECIAL_TOKENS)
# Qwen2.5-VL's ids for the same markers, and its padding (<|endoftext|>).
QWEN_SPECIAL_IDS = dict(vision_start_id=151652, vision_end_id=151653, image_pad_id=151655,
                        pad_id=151643)

# ---- the model per size ------------------------------------------------------------------
_DEMO_VLM = dict(vocab_size=-(-FASHION_MNIST_TOKENIZER.vocab_size // 8) * 8, hidden_size=64,
                 intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
                 mrope_section=(2, 3, 3), rope_theta=10_000.0, tie_word_embeddings=True)
SIZES = {
    "tiny": dict(
        vlm=dict(_DEMO_VLM, hidden_size=32, intermediate_size=64, num_layers=1,
                 mrope_section=(1, 2, 1)),
        adapter_hidden=32, num_shallow_blocks=1, dtype="float32", vlm_dtype="float32",
        deep=dict(width=64, num_layers=2, num_heads=4, mlp_ratio=2.0),
        shallow=dict(width=32, num_layers=1, num_heads=2, mlp_ratio=2.0)),
    "demo": dict(
        vlm=_DEMO_VLM, adapter_hidden=256, num_shallow_blocks=2, dtype="float32",
        vlm_dtype="float32",
        deep=dict(width=128, num_layers=4, num_heads=4, mlp_ratio=4.0),
        shallow=dict(width=64, num_layers=2, num_heads=4, mlp_ratio=4.0)),
    "1b": dict(
        vlm="3b", adapter_hidden=2048, num_shallow_blocks=2, dtype="bfloat16",
        vlm_dtype="bfloat16",
        deep=dict(width=2048, num_layers=16, num_heads=32, mlp_ratio=4.0),
        shallow=dict(width=2048, num_layers=2, num_heads=32, mlp_ratio=4.0)),
    "paper": dict(
        vlm="7b", adapter_hidden=3584, num_shallow_blocks=2, dtype="bfloat16",
        vlm_dtype="bfloat16",
        deep=dict(width=3072, num_layers=24, num_heads=48, mlp_ratio=4.0),
        shallow=dict(width=3072, num_layers=4, num_heads=48, mlp_ratio=4.0)),
}

# ---- the data per size: Fashion-MNIST records (tiny, demo) or converted real data ----------
DATA = {
    "fashion_mnist": dict(
        source="fashion_mnist_stages", source_dir="/usr/share/datasets/fashion-mnist",
        image_size=(28, 28), channels=1, tokenizer="words",
        words=list(fm_records.WORDS), special_tokens=list(SPECIAL_TOKENS),
        special_ids=dict(
            vision_start_id=FASHION_MNIST_TOKENIZER.special_id("<|vision_start|>"),
            vision_end_id=FASHION_MNIST_TOKENIZER.special_id("<|vision_end|>"),
            image_pad_id=FASHION_MNIST_TOKENIZER.special_id("<|image_pad|>"),
            pad_id=FASHION_MNIST_TOKENIZER.pad_id),
        read_threads=0),
    "converted": dict(
        source="", source_dir="", image_size=(256, 256), channels=3, tokenizer="hf",
        tokenizer_json="", special_ids=QWEN_SPECIAL_IDS, precomputed_latents=True,
        read_threads=8),
}
SIZE_DATA = {"tiny": "fashion_mnist", "demo": "fashion_mnist", "1b": "converted",
             "paper": "converted"}

# ---- per stage and size: records, sequence layout, batch, steps, learning rate -------------
DEMO_STAGES = {
    0: dict(kind="text", max_length=40, max_images=1, steps=400, learning_rate=3e-3),
    1: dict(kind="generate", max_length=57, max_images=1, steps=1400, learning_rate=2e-3),
    2: dict(kind="understand", max_length=64, max_images=1, steps=1000, learning_rate=3e-3),
    3: dict(kind="mixture", max_length=112, max_images=2, steps=600, learning_rate=5e-4,
            ntp_weight=3.0),
}
# At scale: captions up to ~250 tokens before a 256-element image; stage 3 holds two images
# (editing, interleaved). Steps and rates are this config's choice (the paper gives neither).
_SCALE_STAGES = {
    1: dict(kind="t2i", max_length=512, max_images=1, steps=100_000, learning_rate=1e-4),
    2: dict(kind="understanding", max_length=512, max_images=1, steps=20_000,
            learning_rate=1e-4),
    3: dict(kind="interleaved", max_length=1024, max_images=2, steps=50_000,
            learning_rate=5e-5, ntp_weight=1.0),
}
STAGES = {"tiny": DEMO_STAGES, "demo": DEMO_STAGES, "1b": _SCALE_STAGES,
          "paper": _SCALE_STAGES}
BATCH = {"tiny": 8, "demo": 32, "1b": 256, "paper": 1024}


def parse(arg):
  """"stage=1,size=paper" -> (1, "paper"); either may be left out (stage 1, size demo)."""
  fields = dict(stage="1", size="demo")
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in fields or not value:
      raise ValueError(f"bad config argument {item!r} in {arg!r}: use stage=S,size=Z")
    fields[key] = value
  if fields["size"] not in SIZES:
    raise ValueError(f"unknown size {fields['size']!r}: one of {sorted(SIZES)}")
  if not fields["stage"].isdigit() or int(fields["stage"]) not in STAGES[fields["size"]]:
    raise ValueError(f"no stage {fields['stage']!r} at size {fields['size']!r}: one of "
                     f"{sorted(STAGES[fields['size']])}")
  return int(fields["stage"]), fields["size"]


def get_config(arg="stage=1,size=demo"):
  stage, size = parse(arg)
  s, m = STAGES[size][stage], SIZES[size]
  fashion_mnist = SIZE_DATA[size] == "fashion_mnist"
  c = ml_collections.ConfigDict()
  c.task = "pretzel"
  c.stage = stage
  c.seed = stage

  c.data = dict(
      DATA[SIZE_DATA[size]],
      dir="",                        # records; "" = <workdir>/data (starflow2 prepare-data)
      train_split=f"{s['kind']}_train", test_split=f"{s['kind']}_test",
      max_length=s["max_length"], max_images=s["max_images"],
      prompt_segments=0,             # records say which segments are the prompt
      # True: batch k depends on (seed, k) only, so a run resumes on another number of hosts
      # (docs/launch.md); the demo keeps its original order.
      elastic=not fashion_mnist)
  if fashion_mnist:
    c.latent = dict(name="patch", patch_size=4)
  else:                              # read from the records; fae_workdir only to draw images
    c.latent = dict(name="fae", fae_workdir="", grid=(16, 16), dim=32)
  c.model = dict(
      vlm=m["vlm"], vlm_dtype=m["vlm_dtype"], adapter_hidden=m["adapter_hidden"],
      # rope_layout: the flow stream's M-RoPE layout ("interleaved": every axis gets high
      # frequencies; "chunked" = Qwen2.5-VL's split, which leaves columns nearly blind).
      deep=dict(m["deep"], rope_layout="interleaved"), shallow=m["shallow"],
      num_shallow_blocks=m["num_shallow_blocks"], scale="softplus", noise_conditioning=True,
      dtype=m["dtype"],
      # What layers keep for the backward pass (layers/remat.py): at scale only each layer's
      # input, for the flow and the frozen VLM alike (docs/plan.md has the memory it saves).
      remat=False if fashion_mnist else "full", vlm_remat="none" if fashion_mnist else "full",
      # nn.scan over the flow's and the VLM's layers (layers/scan.py): at scale one layer is
      # compiled whatever the depth, and FSDP gathers one layer's weights at a time.
      scan_layers=not fashion_mnist)
  c.init = dict(from_workdir="", vlm_checkpoint="",
                # At scale the frozen VLM stays out of the stages' checkpoints and is read
                # back from vlm_checkpoint (the demo's VLM is trained in stage 0: kept).
                checkpoint_vlm=fashion_mnist,
                reinitialise=[])     # regexes of parameters whose shape may differ: fresh init
  # λ: the demo's stage 3 leans on the text loss to keep understanding (the frozen-VLM
  # promise). text_shapes_flow=False: that loss does not reach the demo's 1M-parameter flow
  # (through u into the shallow blocks, through W_t into the deep stream); over 400 stage-3
  # steps it cost 0.13 bits/dim and 5 points of generation (docs/pretzel.md). The paper
  # trains jointly (True), as the sizes at scale do.
  c.loss = dict(ntp_weight=s.get("ntp_weight", 1.0), text_shapes_flow=not fashion_mnist)
  c.noise = (dict(t_min=0.02, t_max=0.2, loss_weighting="t") if fashion_mnist else
             dict(t_min=0.01, t_max=0.7, loss_weighting="t"))    # SPEC §4 at 256 px
  c.train = dict(steps=s["steps"], batch_size=BATCH[size],
                 caption_dropout=0.1, log_every=50, eval_every=0, sample_every=0,
                 checkpoint_every=500 if fashion_mnist else 2000, keep_checkpoints=1,
                 time_limit_minutes=0.0,
                 max_nonfinite_steps=10,     # skipped non-finite steps in a row: stop (0: never)
                 microbatches=1,             # > 1: accumulate the gradient over microbatches
                 final_samples=False)        # the demo draws and judges its own
  c.optimizer = dict(learning_rate=s["learning_rate"], warmup_steps=min(100, s["steps"] // 5)
                     if fashion_mnist else 2000,
                     min_learning_rate=1e-6, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
                     grad_clip_norm=1.0, trainable=list(stages.STAGES[stage].trainable))
  c.eval = (dict(batch_size=250, num_examples=1000, noise_level=0.02) if fashion_mnist else
            dict(batch_size=64, num_examples=1024, noise_level=0.01))
  c.evals = dict(bpd={})
  if fashion_mnist:
    _fashion_mnist_judges(c, stage)
  c.sample = dict(
      captions=([fm_records.caption(k) for k in range(10)] if fashion_mnist else
                ["a red bicycle leaning on a brick wall", "a bowl of ramen, top view"]),
      per_class=4, temperature=0.8 if fashion_mnist else 1.0, guidance_weight=2.0,
      denoise_steps=4, text_temperature=0.0, stop_words=["."] if fashion_mnist else [],
      max_new=64 if fashion_mnist else 300)
  c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1) if fashion_mnist else
                dict(data=1, fsdp=-1, tensor=1),
                rules=[list(rule) for rule in sharding.DEFAULT_RULES])
  if size == "tiny":
    _tiny_run(c, stage)
  return c


def _fashion_mnist_judges(c, stage):
  """What `starflow2 demo` reports, run by the trainer after the last step (evaluators;
  demos/fashion_mnist_judges.py): bits/dim of the stage's test split; generation judged by
  an independent classifier after stages 1 and 3, understanding after 2 and 3. Fixed seeds:
  the same 300 draws are judged after stages 1 and 3 (paired figures)."""
  if stage in (1, 3):
    c.evals.generation = dict(type="fashion_mnist_generation", per_class=30, seed=101)
  if stage == 3:
    c.evals.bpd_generate = dict(type="bpd", split="generate_test")
  if stage in (2, 3):
    c.evals.understanding = dict(type="fashion_mnist_understanding", num_examples=500,
                                 seed=100 + stage)


def _tiny_run(c, stage):
  """The tiny size's run lengths: stage 1 trains long enough (about a minute) for the tiny
  floor of experiments/fashion_mnist_stages.py to mean something: 40% of 200 guided samples
  on the tests' fake classes (chance: 10%); the other stages take 3 steps."""
  steps, batch = (500, 16) if stage == 1 else (3, 8)
  c.train.update(steps=steps, batch_size=batch, log_every=1, checkpoint_every=steps)
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 5)
  c.eval.update(batch_size=8, num_examples=8)
  c.sample.update(per_class=1, denoise_steps=1, max_new=60)
