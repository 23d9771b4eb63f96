"""U-Net trained to bind objects: reconstruction plus object-aware
terms on a small embedding head, clustered by name as the tap "embedding".

Recipe: a 1x1-conv embedding head (16 dims) off the last decoder block; one
self-attention block at the bottleneck (global mixing); a discriminative loss
on pseudo-instance masks from the best no-oracle raw-pixel segmenter
(`config.objectives.pseudo_masks.segmenter`, no labels), computed once per
training image and cached in <workdir>/pseudo_masks. The dense InfoNCE between
two geometric views is off: it lowered every score in both runs, with
same-image negatives (it pushed one object's pixels apart) and with only
other images' (most likely it coded which image a pixel lies in). Turn it on with
--config.objectives.view_infonce.weight=0.5; docs/reports/2026-12-01-object-aware-objectives.md.

The hybrid segmenters ('hybrid' with the oracle K, 'hybrid_predict_k'
without) are scored beside the others: the image's clusters draw the regions,
the learned tap's region means merge them, or their colours where nearly the
same (a shadow's code lies between the object's and the floor's; without the
oracle, while closer than 0.65 on the unit sphere, or than 0.125 in Lab: the
thresholds Blender renders with the official CLEVR assets pick). They are the
recipe's best no-oracle pipeline. Self-training rounds:
--config.objectives.self_training_rounds=2 trains round 1 in <workdir>/round1
on the hybrid's masks of this run's network, then round 2 on round 1's.

  --config=configs/unet_objects.py             the real dataset, the poster's schedule
  --config=configs/unet_objects.py:synthetic   the poster's schedule on synthetic scenes
  --config=configs/unet_objects.py:quick       synthetic, small images, minutes on a CPU
  --config=configs/unet_objects.py:test        tiny, for the test suite
  --config=configs/unet_objects.py:experiment  CLEVR6-like (3-6 objects), 96x128,
                                               3,000 train / 200 test scenes,
                                               about 30 minutes on 2 CPU cores

"""

from clevr_jax import defaults

PRESETS = defaults.PRESETS + ("experiment",)


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose one of "
                     f"{', '.join(repr(p) for p in PRESETS if p)} or none "
                     "(e.g. --config=configs/unet_objects.py:quick)")
  config = defaults.get_config("synthetic" if arg == "experiment" else arg)
  config.name = "unet_objects"
  config.model.skip = True
  config.model.attention_blocks = 1
  config.model.embedding_tap = "dec4"
  config.model.embedding_dim = 16
  config.eval.taps = tuple(config.eval.taps) + ("embedding",)

  obj = config.objectives
  obj.tap = "embedding"
  obj.discriminative.weight = 1.0
  obj.view_infonce.weight = 0.0
  # The post-processed segmenters read learned taps as the loss shapes them:
  # on the unit sphere, where the discriminative margins hold. Two regions of
  # one instance then have means within 2 * delta_v, of two instances at least
  # 2 * delta_d - 2 * delta_v apart (0.4 | 1.1 at the defaults). Every
  # post-processed segmenter merges the tap's region means under the hybrid's tap
  # threshold, 0.65, between the two bounds: chosen on Blender renders with the
  # official assets (docs/reports/2026-12-07-real-asset-renders.md). A run that
  # changes the margins sets --config.eval.segmenters.<name>.tap_merge_threshold
  # between its own bounds. Raw pixels keep their Lab settings. With the oracle K
  # the threshold only sets the distances' scale.
  tap_threshold = config.eval.segmenters.hybrid_predict_k.tap_merge_threshold
  for name in ("split_merge", "split_merge_predict_k", "hybrid", "hybrid_predict_k"):
    config.eval.segmenters[name].tap_transforms = "l2"
    config.eval.segmenters[name].tap_merge_threshold = tap_threshold
  config.eval.segmenter_names = tuple(config.eval.segmenter_names) + (
      "hybrid", "hybrid_predict_k")

  if arg == "experiment":
    config.preset = "experiment"
    data = config.data
    data.image_height, data.image_width = 96, 128
    data.synthetic.min_objects, data.synthetic.max_objects = 3, 6
    data.synthetic.num_train = 3000
    data.synthetic.num_test = 200
    config.batch_size = 16
    config.num_epochs = 5
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.eval.batch_size = 20
    config.eval.kmeans.num_restarts = 5
    config.eval.kmeans.max_iter = 100
  elif arg == "test":
    config.model.embedding_dim = 8
  return config
