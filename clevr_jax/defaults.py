"""Default configuration: the poster's settings on the real `clevr_with_masks` data.

Every run file (`unet_rgb.py`, ...) imports this and overrides what differs.
Presets are chosen through the config argument:

  --config=configs/unet_rgb.py            the real dataset, the poster's schedule
  --config=configs/unet_rgb.py:synthetic  the poster's schedule on synthetic scenes
  --config=configs/unet_rgb.py:quick      synthetic, small images, minutes on a CPU
  --config=configs/unet_rgb.py:test       tiny, for the test suite
"""

from __future__ import annotations

import ml_collections

from clevr_jax.segmentation import spec

PRESETS = ("", "quick", "synthetic", "test")


def base_config() -> ml_collections.ConfigDict:
  """The poster's settings (see shared DESIGN.md) on the real dataset."""
  config = ml_collections.ConfigDict()
  config.name = "default"
  config.preset = ""
  # 'reconstruction' (unsupervised, MSE) or 'segmentation' (supervised, 4 classes).
  config.task = "reconstruction"
  config.seed = 2

  config.data = data = ml_collections.ConfigDict()
  # 'clevr_with_masks' (real) or 'synthetic_clevr' (rendered here).
  data.dataset = "clevr_with_masks"
  # Real data: 'poster' (records 0-6999 train, 7000-7999 test), 'full', 'clevr6'.
  data.real_config = "poster"
  # Where the official GZIP TFRecord is read from: 'manual' (a local copy in
  # manual_dir) or 'gcs' (streamed from its public bucket; needs the network).
  data.source = "manual"
  data.manual_dir = ""  # '' -> <data_dir>/downloads/manual
  data.data_dir = ""  # '' -> TFDS's default (~/tensorflow_datasets)
  # An official-format TFRecord (GZIP) read whole as the test split instead of
  # the dataset's own, e.g. your own CLEVR-format data. '' -> the dataset's test split.
  data.eval_file = ""
  # Its image size when it is neither the configured size nor the official
  # 240x320 (the format does not store it); it is resized to the configured size.
  data.eval_file_height = 0
  data.eval_file_width = 0
  data.image_height = 240
  data.image_width = 320
  # A box cut from every stored image before it is resized to image_height x
  # image_width: (top, bottom, left, right) as fractions of the stored height
  # and width, so that it cuts the same part of any size (Slot Attention's CLEVR
  # crop is rows 29-221 and columns 64-256 of 240x320). () = no crop, no resize.
  data.crop = ()
  data.grayscale = False
  # Keep decoded examples in memory (8000 images: ~1.8 GB as uint8).
  data.cache = True
  data.prefetch_batches = 2
  # Keep the training split on every device (uint8; 8000 poster images with
  # labels: 2.5 GB) and gather batches there: the host then sends each step only
  # its examples' positions. For accelerators with memory to spare.
  data.device_resident = False
  # Synthetic scenes (ignored for the real dataset).
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.seed = 0
  data.synthetic.num_train = 7000
  data.synthetic.num_test = 1000
  data.synthetic.min_objects = 3
  data.synthetic.max_objects = 10
  # The rendered size when it differs from the model's (data.crop set); 0 = image_height/width.
  data.synthetic.height = 0
  data.synthetic.width = 0
  # Toy scenes (configs/slot_attention.py:toy): no colour twice in a scene, no metal.
  data.synthetic.distinct_colors = False
  data.synthetic.metal = True
  # A cube's half side over its size's radius (renderer.SceneConfig.cube_scale):
  # 1 matches the real samples' cubes, 0.7071 CLEVR's generator and its Blender
  # renders (docs/reports/2026-12-07-real-asset-renders.md).
  data.synthetic.cube_scale = 1.0
  # Shadows (renderer.SceneConfig): how many of the key, fill and back lights
  # cast them (1: the key alone); the share of the ambient that is CLEVR's sun,
  # a directional light with sharp shadows (0: none); the share of the floor's
  # light hidden where an object meets it (0: none), and how far (scene units)
  # that dark line reaches. Off by default: the synthetic figures of the docs
  # were measured without them. The real-asset renders' shadows choose 3, 1,
  # 0.2 and 0.05 (docs/reports/2026-12-07-real-asset-renders.md).
  data.synthetic.shadow_lights = 1
  data.synthetic.sun_share = 0.0
  data.synthetic.contact_occlusion = 0.0
  data.synthetic.contact_reach = 0.05
  # A floor of one colour per scene: no shading gradient, no shadows on it.
  data.synthetic.plain_floor = False
  # The camera zoomed in by this factor, objects placed on a floor area 1/zoom
  # as wide (renderer.SceneConfig.zoom): objects larger, the scene in view.
  data.synthetic.zoom = 1.0

  config.model = model = ml_collections.ConfigDict()
  # 'unet' (the poster's U-Net / Auto-Encoder, the fields below) or
  # 'slot_attention' (model.slot_attention; configs/slot_attention.py).
  model.architecture = "unet"
  model.skip = True  # False: the Auto-Encoder
  model.base_width = 8
  model.depth = 4
  model.dropout_rate = 0.0  # the poster found dropout hurt
  # PyTorch's default (momentum 0.1 there); flax's 0.99 leaves short runs with
  # useless running statistics.
  model.bn_momentum = 0.9
  model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'; params stay float32
  # Output channels: -1 derives them from the task (3 RGB, 1 gray, 4 classes).
  model.out_channels = -1
  # Global mixing: pre-norm self-attention blocks after the bottleneck
  # block, with a fixed 2-D sine-cosine position code (no parameters, any size).
  # 0 = off: the poster's network, parameters unchanged.
  model.attention_blocks = 0
  model.attention_heads = 4
  model.attention_mlp_ratio = 2
  # An embedding head (1x1 conv) off one tap, returned as the tap "embedding"
  # (clusterable by name like the others). embedding_dim 0 = no head.
  model.embedding_tap = "dec4"
  model.embedding_dim = 0
  model.slot_attention = slot_attention_config()

  config.loss = ml_collections.ConfigDict()
  # Gray-vs-colour inverse-frequency weighting (the grayscale runs), computed per
  # global batch: see clevr_jax/training/losses.py.
  config.loss.weighted = False

  config.optimizer = opt = ml_collections.ConfigDict()
  opt.learning_rate = 1e-2
  opt.weight_decay = 1e-2
  opt.b1 = 0.9
  opt.b2 = 0.999
  opt.eps = 1e-8
  # 'constant' (the poster), 'cosine' or 'warmup_exponential' (Slot Attention's:
  # linear warm-up over warmup_steps times decay_rate**(step / decay_steps)).
  opt.schedule = "constant"
  opt.warmup_steps = 0
  # Clip the gradient to this global norm before the update; 0 = no clipping.
  opt.grad_clip_norm = 0.0
  opt.decay_rate = 0.5
  opt.decay_steps = 100_000

  config.batch_size = 10  # global: over all devices of all processes
  config.num_epochs = 10
  # A step budget instead of epochs (> 0 overrides num_epochs; the last epoch may
  # stop part-way): Slot Attention's recipe counts steps.
  config.num_train_steps = 0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  config.num_preview_images = 4

  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 10  # global
  ev.taps = ("input", "enc1", "enc2", "enc3", "enc4", "bottleneck",
             "dec1", "dec2", "dec3", "dec4", "output")
  # Hypercolumns scored as extra feature maps: 'enc1+dec4' = those taps, each
  # standardised and upsampled to the finest one's size, concatenated.
  ev.hypercolumns = ()
  ev.max_images = 0  # 0: the whole test split
  ev.num_figure_images = 4
  # K-Means' search settings, shared by every segmenter (each names its own metric
  # and K: eval.segmenters.NAME).
  ev.kmeans = km = ml_collections.ConfigDict()
  km.num_restarts = 10
  km.max_iter = 300
  km.tol = 1e-4
  # Segmenters (the fields: clevr_jax/segmentation/spec.py): every tap, and the
  # raw pixels in --mode=baselines, is scored through each one named in
  # segmenter_names, in that order. 'kmeans' is the poster's protocol.
  ev.segmenters = ml_collections.ConfigDict()
  ev.segmenters.kmeans = segmenter()  # plain cosine K-Means, K = the true masks (oracle)
  ev.segmenters.kmeans_fixed_k = segmenter(k="fixed")  # no oracle: K = its fixed_k
  # Lab colour, K-Means with the oracle K, clusters split into connected
  # components, specks absorbed, one round of boundary refinement (each pixel to
  # the adjacent region of nearest mean colour; as below), adjacent regions
  # merged back to K, a region on the image's border and one off it 1.5x
  # farther apart (as below). Tuned on 200 synthetic 240x320 test scenes
  # (docs/reports/2026-12-06-segmenters-on-devices.md);
  # the border factor chosen on real-asset calibration renders, where it gains
  # 0.018 FG-ARI (on held-out synthetic scenes it costs 0.002;
  # docs/reports/2026-12-07-real-asset-renders.md).
  ev.segmenters.split_merge = segmenter(
      pixel_transforms="lab", tap_transforms="standardize", metric="euclidean",
      modal_size=3, split=True, min_area=1e-3, refine_steps=1, merge=True,
      border_merge_factor=1.5)
  # No oracle: K0 clusters, split, absorb, merge while the closest adjacent
  # regions' mean features are nearer than merge_threshold (K is predicted). A
  # region on the image's border (the floor's pieces) and one off it are 1.5x
  # farther apart, so that grey objects stay off the floor. Factor and threshold
  # chosen jointly on held-out synthetic scenes (dataset seed 1) and checked on
  # real-asset calibration renders (docs/reports/2026-12-07-split.md). One round
  # of refinement gives back the boundary pixels that the majority filter and
  # the absorption moved: chosen on both sets (steps 0-10; one is within 0.002
  # FG-ARI of the best and the cheapest; docs/reports/2026-12-07-refine.md).
  ev.segmenters.split_merge_predict_k = segmenter(
      pixel_transforms="lab", tap_transforms="standardize", metric="euclidean",
      k="predict", num_clusters=11, modal_size=3, split=True, min_area=1e-3, merge=True,
      merge_threshold=0.225, border_merge_factor=1.5, refine_steps=1)
  # The hybrid: pixels draw the boundaries (Lab K0-Means, majority filter,
  # components, one round of refinement by colour), the learned tap decides what
  # belongs together (adjacent regions merged by the tap's region means on the
  # unit sphere, or by their colour).
  # The tap's 0.65 lies between the discriminative margins' bounds (objectives.
  # discriminative below) on two regions of one instance (2 * delta_v = 0.4) and
  # of two (2 * delta_d - 2 * delta_v = 1.1); colour's 0.125 (Lab / 100) lets a
  # shadow join the floor it is nearly the colour of. Both, and the margins, chosen
  # on Blender renders with the official CLEVR assets
  # (docs/reports/2026-12-07-real-asset-renders.md); the synthetic scenes chose
  # 0.6 and 0.1 at delta_d = 0.5 (docs/reports/2026-12-06-hybrid-segmenter.md).
  hybrid = dict(pixel_transforms="lab", tap_transforms="l2", metric="euclidean",
                num_clusters=11, modal_size=3, split=True, min_area=1e-3, refine_steps=1,
                merge=True, split_source="pixels", merge_source="tap_or_pixels",
                merge_threshold=0.2, tap_merge_threshold=0.65, colour_merge_threshold=0.125)
  ev.segmenters.hybrid = segmenter(**hybrid)
  ev.segmenters.hybrid_predict_k = segmenter(**hybrid, k="predict")
  ev.segmenter_names = ("kmeans", "kmeans_fixed_k", "split_merge", "split_merge_predict_k")
  # R: region slots per image after absorbing specks, the static size of the
  # device merge (an R x R distance matrix). An image with more regions has its
  # smallest absorbed too, with a warning that names this field.
  ev.max_regions = 128
  # Baselines (--mode=baselines): raw pixels through every segmenter, and random masks.
  ev.baselines_seed = 0
  # Progress lines of long evaluation loops, at most this often.
  ev.progress_every_s = 10.0
  # --mode=segment: the segmenter applied to user images. The best one that needs
  # no K; --num_clusters overrides its K-Means clusters (K0), or is K for one
  # that takes K.
  ev.user_segmenter = "split_merge_predict_k"

  config.objectives = objectives_config()
  return config


def slot_attention_config() -> ml_collections.ConfigDict:
  """Slot Attention's fields (clevr_jax/models/slot_attention.py): the paper's CLEVR model."""
  sa = ml_collections.ConfigDict()
  sa.num_slots = 7
  sa.num_iterations = 3
  sa.slot_size = 64
  sa.mlp_hidden = 128
  sa.epsilon = 1e-8
  sa.scale = 0.0  # attention logits' scale; 0 = 1 / sqrt(slot_size), the paper's
  # 'gru' (the paper) or 'mean': the slots become the weighted means, as in
  # soft K-Means (with mlp and layer_norm off: tests/test_slot_attention.py).
  sa.update_rule = "gru"
  sa.mlp = True
  sa.layer_norm = True
  # The initial slots: 'gaussian' (the paper's, a learned mean and spread),
  # 'learned' (BO-QSA's queries, one per slot, straight through to the last
  # iteration) or 'kmeans' (centroids of a K-Means of the values after
  # kmeans_iterations Lloyd steps from far-apart points; no gradient).
  sa.init = "gaussian"
  sa.kmeans_iterations = 5
  # Stop the gradient before the last iteration (implicit differentiation,
  # Chang et al., 2022); 'learned' initial slots always do.
  sa.implicit_grad = False
  # The paper's pixel range: images mapped from [0, 1] to [-1, 1] before the
  # encoder and the reconstruction mapped back (the loss stays on [0, 1]). It
  # sets the colour features' scale beside the position embedding's.
  sa.symmetric_input = False
  sa.encoder_features = (64, 64, 64, 64)
  sa.encoder_kernel = 5
  sa.decoder_features = 64
  # Stride-2 transposed convolutions: the slots are broadcast at
  # (height, width) / 2**decoder_upsamplings (8x8 at 128x128, the paper's).
  sa.decoder_upsamplings = 4
  # Stride-1 transposed convolutions after them, before the output layer (the
  # paper's CLEVR decoder: 1; at the full resolution, Multi-dSprites': 3).
  sa.decoder_layers = 1
  sa.decoder_kernel = 5
  return sa


def segmenter(**overrides) -> ml_collections.ConfigDict:
  """One segmenter's config entry: every field of `spec.Segmenter` (which documents
  them) at its default but `overrides`, so that any can be set from the command
  line (--config.eval.segmenters.NAME.FIELD=...)."""
  return spec.to_config(**overrides)


def objectives_config() -> ml_collections.ConfigDict:
  """Object-aware objectives (clevr_jax/objects/objectives.py), each a term added to the
  reconstruction loss with its weight; every weight 0 = off (the poster's runs)."""
  obj = ml_collections.ConfigDict()
  obj.tap = "embedding"  # the tap the terms shape (any tap name of the model)
  # De Brabandere et al.'s discriminative loss on pseudo-instance masks.
  obj.discriminative = d = ml_collections.ConfigDict()
  d.weight = 0.0
  d.normalize = True  # on the unit sphere, as cosine K-Means sees the tap
  d.delta_v = 0.2  # pull pixels to within this distance of their mask's mean
  # Push two masks' means at least 2 * delta_d apart: 0.75 against 0.5 gains
  # 0.02 in the hybrid's mean margin over the pixels on real-asset calibration
  # renders (docs/reports/2026-12-07-real-asset-renders.md, section 10).
  d.delta_d = 0.75
  d.var_weight = 1.0
  d.dist_weight = 1.0
  d.reg_weight = 0.001
  # DetCon-style mask-pooled InfoNCE on pseudo-instance masks.
  obj.mask_infonce = mi = ml_collections.ConfigDict()
  mi.weight = 0.0
  mi.temperature = 0.1
  mi.queries = "pixel"  # 'pixel' (works with one view) or 'mask' (DetCon; two views)
  mi.num_pixel_queries = 64  # per image
  # PixPro / VADeR-style dense InfoNCE between two geometric views.
  obj.view_infonce = vi = ml_collections.ConfigDict()
  vi.weight = 0.0
  vi.temperature = 0.1
  vi.num_points = 64  # sampled per image; negatives: the batch's other points
  # Same-image points nearer than this (normalised source units) are no
  # negatives (likely the same object); >= 2: only other images' points are.
  vi.exclude_radius = 0.1
  vi.symmetric = True
  # Geometric views: random resized crop (area fraction, aspect) + horizontal flip.
  obj.views = v = ml_collections.ConfigDict()
  v.two_views = False  # force two views even when no term needs them
  v.min_scale = 0.3
  v.max_scale = 1.0
  v.min_aspect = 3 / 4
  v.max_aspect = 4 / 3
  v.flip_prob = 0.5
  # Pseudo-instance masks from a raw-pixel segmenter, computed once per
  # training image and cached (clevr_jax/objects/pseudo_masks.py).
  obj.pseudo_masks = pm = ml_collections.ConfigDict()
  pm.max_labels = 16  # masks kept per image (largest first); the rest are absorbed
  pm.min_purity = 0.5  # tap pixels whose majority mask covers less are ignored
  pm.cache_dir = ""  # '' -> <workdir>/pseudo_masks
  # The eval segmenter (config.eval.segmenters) that makes them; it must
  # predict K (no labels): by default the best no-oracle raw-pixel pipeline.
  pm.segmenter = "split_merge_predict_k"
  # Self-training: round n >= 1 trains on masks of the segmenter
  # `round_segmenter` (it must predict K; by default the hybrid: pixels split,
  # the learned tap `objectives.tap` merges) run on round n-1's network, the
  # newest checkpoint of `teacher_workdir`. Cached per round (<split>_round<n>.npz).
  pm.round = 0
  pm.round_segmenter = "hybrid_predict_k"
  pm.teacher_workdir = ""
  # Rounds a --mode=train run chains after its own (round 0): round n trains
  # from scratch in <workdir>/round<n> on round n-1's masks, then is scored.
  obj.self_training_rounds = 0
  return obj


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  """Overrides `config` in place for a preset name (see module docstring)."""
  if preset not in PRESETS:
    raise ValueError(
        f"unknown preset {preset!r}; choose one of "
        f"{', '.join(repr(p) for p in PRESETS if p)} or none "
        "(e.g. --config=configs/unet_rgb.py:quick)")
  config.preset = preset
  if not preset:
    return
  config.data.dataset = "synthetic_clevr"
  if preset == "quick":
    # Minutes on a 2-core CPU: small images, a few hundred scenes.
    config.data.image_height, config.data.image_width = 96, 128
    config.data.synthetic.num_train = 400
    config.data.synthetic.num_test = 40
    config.batch_size = 8
    config.num_epochs = 3
    config.log_every_steps = 10
    config.checkpoint_every_steps = 50
    config.eval.batch_size = 8
    config.eval.kmeans.num_restarts = 3
    config.eval.kmeans.max_iter = 100
  elif preset == "test":
    config.data.image_height, config.data.image_width = 48, 64
    config.data.synthetic.num_train = 32
    config.data.synthetic.num_test = 12
    config.data.synthetic.max_objects = 6
    config.batch_size = 8
    config.num_epochs = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.eval.batch_size = 8
    config.eval.num_figure_images = 2
    config.num_preview_images = 2
    config.eval.kmeans.num_restarts = 2
    config.eval.kmeans.max_iter = 50


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config()
  apply_preset(config, arg or "")
  return config
