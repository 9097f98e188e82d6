"""The STARFlow2 training stages (SPEC §4; stage 0 for the demo): the one stage table.

Each row says which losses run, whether captions are dropped for classifier-free guidance,
whether the Pretzel has the vertical skips W_v, W_t, and which parameters train by default
(regexes over '/'-joined parameter names; experiment configs copy `trainable` into
`optimizer.trainable`, presets count it).

  stage 0  language model  L_NTP on text      trains vlm/ (demo only: real runs load Qwen)
  stage 1  text -> image   L_flow             trains flow/, shallow_k/
  stage 2  understanding   L_NTP              trains adapter/
  stage 3  interleaved     L_flow + λ L_NTP   trains flow/, shallow_k/, adapter/, w_v, w_t

Stage 0 stands in for a pretrained VLM where none can be loaded (the demo): it pretrains the
VLM's text decoder on text alone. Real runs start stage 1 from converted Qwen weights.
"""

import dataclasses

FLOW = (r"flow/.*", r"shallow_\d+/.*")


@dataclasses.dataclass(frozen=True)
class Stage:
  flow_loss: bool
  ntp_loss: bool
  caption_dropout: bool
  skips: bool
  trainable: tuple
  text_only: bool = False    # the VLM stream alone, on text records, its parameters trained

  @property
  def needs_flow_stream(self):
    """Whether a step runs the flow stream (stage 2's text loss does not read it)."""
    return self.flow_loss or self.skips


STAGES = {
    0: Stage(flow_loss=False, ntp_loss=True, caption_dropout=False, skips=False,
             trainable=(r"vlm/.*",), text_only=True),
    1: Stage(flow_loss=True, ntp_loss=False, caption_dropout=True, skips=False, trainable=FLOW),
    2: Stage(flow_loss=False, ntp_loss=True, caption_dropout=False, skips=False,
             trainable=(r"adapter/.*",)),
    3: Stage(flow_loss=True, ntp_loss=True, caption_dropout=True, skips=True,
             trainable=FLOW + (r"adapter/.*", r"w_v/.*", r"w_t/.*")),
}


def stage_of(config):
  """The row of `config.stage`, with an error naming the key when there is none."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {sorted(STAGES)}")
  return STAGES[config.stage]
