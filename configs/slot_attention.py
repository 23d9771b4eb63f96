"""Slot Attention (Locatello et al., 2020) trained and scored in the project's pipeline.

The model reconstructs the image as the alpha-weighted sum of its slots'
decodings (the reconstruction MSE trains it, like the U-Net). Its slot masks
(the decoder's alphas, tap 'slot_masks', and the last iteration's attention,
tap 'attention') are scored as segmentations by the segmenter 'slot_argmax':
each pixel takes the slot with the largest alpha, K = num_slots, no oracle.
The encoder's features (tap 'encoder') are clustered by every segmenter like
any other tap.

  --config=configs/slot_attention.py             the real clevr_with_masks data at
                                                 240x320 (the poster's split, up to 10
                                                 objects), the paper's model and training
  --config=configs/slot_attention.py:paper       the paper's CLEVR6 recipe for accelerators:
                                                 centre crop 192x192, resized to 128x128,
                                                 7 slots, 3 iterations, batch 64, Adam lr
                                                 4e-4, 10k warm-up, halved every 100k
                                                 steps, 500k steps (FG-ARI 0.988 reported)
  --config=configs/slot_attention.py:synthetic   the paper's model on synthetic CLEVR6-like
                                                 scenes (128x128 crops of 240x320)
  --config=configs/slot_attention.py:experiment  CPU, CLEVR6-like synthetic scenes at 64x64
                                                 (crops of 96x128), a narrower model,
                                                 748 steps: about 50 minutes on one
                                                 idle core (measured: docs/slots.md)
  --config=configs/slot_attention.py:toy         CPU, toy scenes where binding is cheap to
                                                 learn: 2-4 rubber objects of distinct
                                                 colours, zoomed in 2x, 32x32 (the paper's
                                                 crop of 40x52), the paper's pixel range,
                                                 5 slots (objects + 1), a narrower model,
                                                 the decoder at the full resolution
  --config=configs/slot_attention.py:quick       synthetic, 64x64, minutes on a CPU
  --config=configs/slot_attention.py:test        tiny, for the test suite
"""

from clevr_jax import defaults

PRESETS = defaults.PRESETS + ("paper", "experiment", "toy")
_CLEVR6_OBJECTS = (3, 6)
_TOY_OBJECTS = (2, 4)
# The paper's CLEVR crop, rows 29-221 and columns 64-256 of 240x320, as fractions
# of the image (config.data.crop): the same part of a scene rendered at any size.
_PAPER_CROP = (29 / 240, 221 / 240, 64 / 320, 256 / 320)


def _paper_training(config) -> None:
  """The paper's optimisation: Adam, lr 4e-4, linear warm-up over 10k steps,
  decay by half every 100k steps, batch 64, 500k steps."""
  opt = config.optimizer
  opt.learning_rate = 4e-4
  opt.weight_decay = 0.0  # Adam
  opt.schedule = "warmup_exponential"
  opt.warmup_steps = 10_000
  opt.decay_rate = 0.5
  opt.decay_steps = 100_000
  config.batch_size = 64
  config.eval.batch_size = 64


def _cpu_scenes_and_model(config) -> None:
  """:experiment and :quick: CLEVR6-like scenes rendered at 96x128, centre-cropped
  (the paper's crop, scaled) and resized to 64x64; a narrower model whose step fits
  a CPU."""
  data, sa = config.data, config.model.slot_attention
  data.synthetic.min_objects, data.synthetic.max_objects = _CLEVR6_OBJECTS
  data.synthetic.height, data.synthetic.width = 96, 128
  data.crop = _PAPER_CROP
  data.image_height = data.image_width = 64
  sa.encoder_features = (32, 32, 32, 32)
  sa.slot_size = 32
  sa.mlp_hidden = 64
  sa.decoder_features = 32
  sa.decoder_upsamplings = 3
  # 3x3 in the decoder (the paper's 5x5 at 7 slots is most of the step):
  # 4.3 GFLOP per image for training instead of 7.8.
  sa.decoder_kernel = 3


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose one of "
                     f"{', '.join(repr(p) for p in PRESETS if p)} or none "
                     "(e.g. --config=configs/slot_attention.py:quick)")
  base = {"paper": "", "experiment": "synthetic", "toy": "synthetic"}.get(arg, arg)
  config = defaults.get_config(base)
  config.preset = arg
  config.name = "slot_attention"
  config.model.architecture = "slot_attention"
  sa = config.model.slot_attention  # the paper's CLEVR model (defaults.py)
  _paper_training(config)
  config.eval.taps = ("input", "encoder", "attention", "slot_masks", "output")
  # The slot masks as a segmentation: argmax over the slots, no K-Means, no oracle.
  config.eval.segmenters.slot_argmax = defaults.segmenter(
      cluster="argmax", taps=("attention", "slot_masks"), k="fixed",
      num_clusters=sa.num_slots)
  config.eval.segmenter_names = tuple(config.eval.segmenter_names) + ("slot_argmax",)
  data = config.data

  # The paper's pixel range ([-1, 1]) for the presets of its recipe, for the toy
  # set, where it turns the slots' vertical bands into regions around the
  # objects, and for :experiment, where the slot masks leave chance within its
  # budget in it and not in [0, 1] (docs/slots.md); :quick keeps [0, 1].
  sa.symmetric_input = arg in ("", "paper", "synthetic", "toy", "experiment")
  if arg == "":
    # The real data as the poster uses it, at its full size (the slots are
    # broadcast at 15x20), with the paper's training. Its own recipe is :paper.
    config.num_train_steps = 500_000
    config.checkpoint_every_steps = 5_000
    config.log_every_steps = 100
  elif arg in ("paper", "synthetic"):
    if arg == "paper":
      data.real_config = "clevr6"
    else:
      data.synthetic.min_objects, data.synthetic.max_objects = _CLEVR6_OBJECTS
      data.synthetic.height, data.synthetic.width = 240, 320
    # The paper's crop of the 240x320 images, resized to 128x128.
    data.crop = _PAPER_CROP
    data.image_height = data.image_width = 128
    config.num_train_steps = 500_000
    config.checkpoint_every_steps = 5_000
    config.log_every_steps = 100
  elif arg == "experiment":
    _cpu_scenes_and_model(config)
    data.synthetic.num_train = 3000
    data.synthetic.num_test = 200
    config.optimizer.warmup_steps = 500
    config.optimizer.decay_steps = 20_000
    config.batch_size = 16
    # 748 steps: about 50 minutes on one idle core (4.0 images/s measured with
    # two seeds side by side on 2 cores, docs/slots.md).
    config.num_epochs = 4
    config.keep_checkpoints = 100  # every checkpoint, for tools/slot_curve.py
    config.checkpoint_every_steps = 125
    config.log_every_steps = 25
    config.eval.batch_size = 20
    config.eval.kmeans.num_restarts = 5
    config.eval.kmeans.max_iter = 100
  elif arg == "toy":
    _cpu_scenes_and_model(config)
    # Colour alone tells a scene's objects apart; the paper's crop of a 40x52
    # render is 32x32 pixels (rows 5-37, columns 10-42), so no resampling.
    data.synthetic.min_objects, data.synthetic.max_objects = _TOY_OBJECTS
    data.synthetic.distinct_colors, data.synthetic.metal = True, False
    data.synthetic.height, data.synthetic.width = 40, 52
    # The camera zoomed in 2x: objects cover 35% of the crop rather than 12%
    # (Multi-dSprites' scale), and the slots find them sooner (docs/slots.md).
    data.synthetic.zoom = 2.0
    data.image_height = data.image_width = 32
    sa.encoder_kernel = 3  # 9x9 receptive field after 4 layers: a toy object's size
    # The paper's decoder for its small sets (Multi-dSprites, Tetrominoes): the
    # slots broadcast at the full resolution, stride-1 layers only (here one, 3x3).
    # Upsampled from 4x4, every slot decodes the whole scene and the transposed
    # convolutions' checkerboard picks each pixel's slot (docs/slots.md).
    sa.decoder_upsamplings = 0
    data.synthetic.num_train = 3000
    data.synthetic.num_test = 200
    sa.num_slots = _TOY_OBJECTS[1] + 1  # objects + the background
    config.eval.segmenters.slot_argmax.num_clusters = sa.num_slots
    config.optimizer.warmup_steps = 100
    config.optimizer.decay_steps = 20_000
    config.batch_size = 16
    config.num_train_steps = 2_000
    config.keep_checkpoints = 100  # every checkpoint, for tools/slot_curve.py
    config.checkpoint_every_steps = 100
    config.log_every_steps = 25
    config.eval.batch_size = 20
    # The slot masks are what this preset is for: its evaluation scores them only.
    config.eval.taps = ("attention", "slot_masks")
    config.eval.segmenter_names = ("slot_argmax",)
  elif arg == "quick":
    _cpu_scenes_and_model(config)
    config.optimizer.warmup_steps = 50
    config.batch_size = 8
    config.eval.batch_size = 8
  elif arg == "test":
    sa.num_slots = 4
    sa.num_iterations = 2
    sa.encoder_features = (8, 8)
    sa.encoder_kernel = 3
    sa.slot_size = 8
    sa.mlp_hidden = 16
    sa.decoder_features = 8
    sa.decoder_upsamplings = 2
    sa.decoder_kernel = 3
    config.eval.segmenters.slot_argmax.num_clusters = sa.num_slots
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 2
    config.batch_size = 8
    config.eval.batch_size = 8
  return config
