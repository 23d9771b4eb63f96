"""Slot Attention (clevr_jax/models/slot_attention.py, configs/slot_attention.py).

Its link to the poster's K-Means (one iteration with identity projections is a
soft K-Means step; in the hard limit, a step of the project's cosine Lloyd),
the taps, the schedule, the crop, the data-parallel step (4 devices equal 1, in
float64, in child processes started with this module), resuming, and the
evaluation that scores the slot masks.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clevr_jax import evaluation
from clevr_jax import models
from clevr_jax import sharding
from clevr_jax.data import pipeline
from clevr_jax.models import slot_attention
from clevr_jax.segmentation import kmeans
from clevr_jax.training import state as state_lib
from clevr_jax.training import train
from clevr_jax.training import train_step
from tests.helpers.early_start import selected_in_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_PARALLEL = os.path.join(REPO_ROOT, "tests", "helpers", "data_parallel.py")
SAMPLES = os.path.join(REPO_ROOT, "tests", "data", "clevr_with_masks_samples")


# The recipe switches, each on in one variant (a few per variant keeps the
# children few): BO-QSA's learned queries with global-norm clipping small
# enough to act and the paper's pixel range, and the K-Means initialiser with
# implicit differentiation.
_SWITCH_VARIANTS = {
    "paper": (),
    "learned_clipped": ("--config.model.slot_attention.init=learned",
                        "--config.optimizer.grad_clip_norm=0.01",
                        "--config.model.slot_attention.symmetric_input=True"),
    # with the decoder at the full resolution, deeper (no upsampling, 2 layers)
    "kmeans_implicit_full_resolution": ("--config.model.slot_attention.init=kmeans",
                                        "--config.model.slot_attention.implicit_grad=True",
                                        "--config.model.slot_attention.decoder_upsamplings=0",
                                        "--config.model.slot_attention.decoder_layers=2"),
}


@pytest.fixture(scope="module")
def _device_runs(tmp_path_factory, data_dir, start_python):
  """slot_attention:test, 3 float64 train steps on 1 and on 4 devices (children),
  for each variant of the recipe switches."""
  root = tmp_path_factory.mktemp("slot_devices")
  runs = {}
  for variant, overrides in _SWITCH_VARIANTS.items():
    for devices in (1, 4):
      out = str(root / f"{variant}_devices{devices}.npz")
      runs[variant, devices] = (out, start_python(
          [DATA_PARALLEL, f"--config={REPO_ROOT}/configs/slot_attention.py:test",
           f"--config.data.data_dir={data_dir}", "--config.optimizer.eps=1.0", *overrides,
           "--steps=3", f"--out={out}", "--float64"], devices=devices))
  return runs


@pytest.fixture(scope="module", autouse=True)
def _start_device_runs(request):
  if selected_in_module(request, "_device_runs"):
    request.getfixturevalue("_device_runs")


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clustered_points(rng, k=4, per_cluster=20, d=6, spread=0.15):
  """Unit points around k unit centres, and initial slots near (not at) the centres."""
  centres = _unit(rng.standard_normal((k, d)))
  points = _unit(np.repeat(centres, per_cluster, 0)
                 + spread * rng.standard_normal((k * per_cluster, d)))
  slots = _unit(centres + 0.3 * rng.standard_normal((k, d)))
  return points[rng.permutation(len(points))][None], slots[None]


def _kmeans_iteration(points, slots, temperature):
  """One SlotAttention iteration reduced to the K-Means skeleton: identity
  projections, the slots replaced by the weighted means (no GRU, MLP or
  LayerNorm), logits scaled by 1 / temperature, epsilon 0."""
  d = points.shape[-1]
  module = slot_attention.SlotAttention(
      slot_size=d, num_iterations=1, epsilon=0.0, scale=1 / temperature,
      update="mean", mlp=False, layer_norm=False, dtype=jnp.float64)
  identity = {"kernel": jnp.eye(d, dtype=jnp.float64)}
  params = {"project_q": identity, "project_k": identity, "project_v": identity}
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(module.init, jax.random.key(0), points, slots)["params"])
  return module.apply({"params": params}, points, slots)


def test_one_iteration_is_a_soft_kmeans_step():
  # Soft K-Means on the unit sphere (the poster's cosine K-Means, made soft),
  # written from its definition: responsibilities from squared distances,
  # centres as responsibility-weighted means. Slot attention computes them
  # from dot products; on unit vectors |x - mu|^2 = 2 - 2 x.mu, so the softmax
  # over the slots is the same. In float64: any difference above ~1e-13 is a
  # different algorithm, not rounding.
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    points, slots = _clustered_points(rng)
    for temperature in (0.05, 0.5, 2.0):
      new_slots, attention = _kmeans_iteration(jnp.asarray(points), jnp.asarray(slots),
                                               temperature)
      sq_dist = np.sum((points[0][:, None, :] - slots[0][None]) ** 2, -1)  # [n, K]
      logits = -sq_dist / (2 * temperature)
      resp = np.exp(logits - logits.max(1, keepdims=True))
      resp /= resp.sum(1, keepdims=True)
      centres = resp.T @ points[0] / resp.sum(0)[:, None]
      np.testing.assert_allclose(np.asarray(attention[0]), resp.T, rtol=0, atol=1e-13)
      np.testing.assert_allclose(np.asarray(new_slots[0]), centres, rtol=0, atol=1e-13)
      # Not the plain mean: the responsibilities are soft and depend on the slots.
      assert np.abs(centres - points[0].mean(0)).max() > 0.1


def test_in_the_hard_limit_one_iteration_is_a_step_of_the_posters_cosine_lloyd():
  # As the temperature goes to 0 the softmax over the slots becomes the nearest
  # slot by cosine: one iteration is then one Lloyd step of the project's
  # spherical K-Means (kmeans.lloyd, max_iter=1), up to the normalisation
  # cosine K-Means applies to its centroids. The margin: every point's best
  # cosine beats its second best by gap; at temperature gap / 60 the other
  # slots share at most K e^-60 ~ 4e-26 of its weight.
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    points, slots = _clustered_points(rng)
    cos = points[0] @ slots[0].T
    top2 = np.sort(cos, 1)[:, -2:]
    gap = float(np.min(top2[:, 1] - top2[:, 0]))
    assert gap > 1e-3
    new_slots, _ = _kmeans_iteration(jnp.asarray(points), jnp.asarray(slots), gap / 60)
    result = kmeans.lloyd(jnp.asarray(points), jnp.asarray(slots), jnp.array([4]),
                          max_iter=1, tol=0.0, metric="cosine")
    assert int(result.n_iter[0]) == 1
    np.testing.assert_allclose(_unit(np.asarray(new_slots[0])), np.asarray(result.centroids[0]),
                               rtol=0, atol=1e-10)
    # Its labels are the final assignment, to the updated centroids.
    updated = points[0] @ _unit(np.asarray(new_slots[0])).T
    np.testing.assert_array_equal(np.argmax(updated, 1), np.asarray(result.labels[0]))


def _colour_binding_model(num_slots, iterations):
  """The autoencoder with weights chosen by hand so that its slots can only
  group pixels by colour: the encoder copies RGB into the first three of 8
  channels (a 3x3 convolution with only its centre tap, no position: the
  position embedding is zero), its LayerNorm is the identity affine and its MLP
  the identity (a bias of +10 keeps the ReLU linear, -10 removes it); the slot
  attention has no GRU, MLP or LayerNorm (`update='mean'`), identity
  projections for the queries and values and 4 x identity for the keys, the
  paper's logit scale 1 / sqrt(8); the initial slots are standard normal."""
  width = 8
  model = slot_attention.SlotAttentionAutoEncoder(
      num_slots=num_slots, num_iterations=iterations, slot_size=width, mlp_hidden=width,
      update="mean", mlp=False, layer_norm=False, encoder_features=(width,),
      encoder_kernel=3, decoder_features=4, decoder_upsamplings=1, decoder_kernel=3,
      dtype=jnp.float64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 12, 3)),
                          train=False)["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float64), shapes)
  eye = jnp.eye(width, dtype=jnp.float64)
  params["encoder1"]["kernel"] = params["encoder1"]["kernel"].at[1, 1, :3, :3].set(jnp.eye(3))
  params["encoder_norm"]["scale"] = jnp.ones(width, jnp.float64)
  params["encoder_mlp1"] = {"kernel": eye, "bias": jnp.full(width, 10.0)}
  params["encoder_mlp2"] = {"kernel": eye, "bias": jnp.full(width, -10.0)}
  params["slot_attention"] = {"project_q": {"kernel": eye}, "project_k": {"kernel": 4 * eye},
                              "project_v": {"kernel": eye}}
  return model, params


def test_with_hand_chosen_weights_the_slots_attention_separates_two_colours():
  # A binding test of the whole path from pixels to the 'attention' tap: the
  # encoder, the flattening of the feature map, the softmax over the slots, the
  # weighted mean, the iterations, and the tap's reshape back to the image. On a
  # two-colour image in a random (not spatial) pattern, 8 x 12 so that a
  # transposed reshape shows, two slots must end on one colour each, whatever
  # the initial noise: every pixel's largest slot is its colour's, and it holds
  # nearly all of the pixel's attention. The pixels of a colour have equal
  # features, so the two slots converge to the two colours' features
  # (soft K-Means with two well-separated points); from the 8 draws below the
  # winner's share is above 0.96 after 3 iterations, 0.9999 after 5 (float64:
  # rounding does not enter a 0.99 margin). A softmax over the pixels instead
  # of the slots, a weighted sum in place of the weighted mean, or the tap
  # reshaped as [width, height], fails it.
  rng = np.random.default_rng(0)
  red = rng.random((8, 12)) < 0.4
  image = np.where(red[..., None], [0.9, 0.1, 0.1], [0.1, 0.2, 0.9])[None]
  with jax.enable_x64(True):
    model, params = _colour_binding_model(num_slots=2, iterations=5)
    for key in range(8):
      _, taps = model.apply({"params": params}, jnp.asarray(image), train=True,
                            taps=("attention",), rngs={"slots": jax.random.key(key)})
      attention = np.asarray(taps["attention"][0])  # [8, 12, 2]
      winner = attention.argmax(-1)
      assert len(set(winner[red])) == 1 and len(set(winner[~red])) == 1, key
      assert winner[red][0] != winner[~red][0], key
      assert attention.max(-1).min() > 0.99, key


@pytest.mark.parametrize("upsamplings, layers", [(0, 3), (2, 0)])
def test_the_decoder_upsamples_then_adds_its_stride_one_layers(upsamplings, layers):
  # decoder1..decoder{upsamplings} double the grid (stride 2), the next
  # `layers` keep it (stride 1), then the output layer: its input grid is the
  # image's size whatever the split.
  model = slot_attention.SlotAttentionAutoEncoder(
      num_slots=2, slot_size=4, mlp_hidden=4, encoder_features=(4,), encoder_kernel=3,
      decoder_features=4, decoder_upsamplings=upsamplings, decoder_layers=layers,
      decoder_kernel=3)
  images = jnp.zeros((1, 8, 12, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, train=False)["params"]
  decoders = sorted(name for name in shapes if name.startswith("decoder"))
  assert decoders == sorted([f"decoder{i + 1}" for i in range(upsamplings + layers)]
                            + ["decoder_output", "decoder_position"])
  output = jax.eval_shape(lambda p: model.apply({"params": p}, images, train=False)[0], shapes)
  assert output.shape == images.shape


def test_the_symmetric_input_is_the_same_network_on_images_mapped_to_minus_one_one():
  # With the same parameters, the network on x with symmetric_input equals the
  # network without it on 2x - 1, its output mapped back by (y + 1) / 2: the
  # switch changes the pixels' range and nothing else.
  fields = dict(num_slots=3, slot_size=8, mlp_hidden=8, encoder_features=(8,), encoder_kernel=3,
                decoder_features=8, decoder_upsamplings=1, decoder_kernel=3)
  plain = slot_attention.SlotAttentionAutoEncoder(**fields)
  symmetric = slot_attention.SlotAttentionAutoEncoder(**fields, symmetric_input=True)
  images = jax.random.uniform(jax.random.key(1), (2, 8, 12, 3))
  variables = plain.init(jax.random.key(0), images, train=False)
  mapped, _ = plain.apply(variables, 2 * images - 1, train=False)
  output, _ = symmetric.apply(variables, images, train=False)
  # float32 roundings of values of order 1 through a small network: 1e-5 is
  # about 100 roundings, where the two programs differ by a few.
  np.testing.assert_allclose(np.asarray(output), (np.asarray(mapped) + 1) / 2, rtol=0, atol=1e-5)
  assert not np.allclose(np.asarray(output), np.asarray(plain.apply(variables, images,
                                                                    train=False)[0]), atol=1e-3)


def test_taps_have_their_shapes_and_the_masks_split_each_pixel_over_the_slots(test_config):
  config = test_config("slot_attention")
  model = models.make_model(config)
  variables = state_lib.init_variables(model, models.input_shape(config), config.seed)
  images = jax.random.uniform(jax.random.key(0), (2, 48, 64, 3))
  output, taps = model.apply(variables, images, train=False,
                             taps=models.config_tap_names(config))
  k, d = config.model.slot_attention.num_slots, config.model.slot_attention.slot_size
  assert output.shape == images.shape and output.dtype == jnp.float32
  assert {t: v.shape for t, v in taps.items()} == {
      "input": (2, 48, 64, 3), "encoder": (2, 48, 64, d), "attention": (2, 48, 64, k),
      "slot_masks": (2, 48, 64, k), "output": (2, 48, 64, 3)}
  # Softmaxes over the slots: each sums to 1 within a few float32 roundings of
  # K terms of at most 1 (K * 2**-23 ~ 5e-7).
  for tap in ("attention", "slot_masks"):
    assert np.all(np.asarray(taps[tap]) >= 0)
    np.testing.assert_allclose(np.asarray(taps[tap]).sum(-1), 1.0, rtol=0, atol=k * 2.0**-23)
  # Evaluation draws fixed noise: the same slots for the same image, every call.
  again, _ = model.apply(variables, images, train=False)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(output))
  with pytest.raises(ValueError, match="Unknown tap"):
    model.apply(variables, images, train=False, taps=("enc1",))
  with pytest.raises(ValueError, match="divisible by 2\\*\\*decoder_upsamplings"):
    model.apply(variables, images[:, :46], train=False)


def test_initial_slots_are_drawn_per_example_from_the_slots_stream(test_config):
  # A train step keys each example's noise by its row in the global batch:
  # examples differ, the same row gets the same noise whatever the batch's
  # other rows, and another key gives other slots.
  config = test_config("slot_attention")
  model = models.make_model(config)
  variables = state_lib.init_variables(model, models.input_shape(config), config.seed)
  images = jax.random.uniform(jax.random.key(0), (3, 48, 64, 3))
  same = jnp.broadcast_to(images[:1], images.shape)

  def masks(x, key):
    return np.asarray(model.apply(variables, x, train=True, taps=("slot_masks",),
                                  rngs={"slots": key})[1]["slot_masks"])

  key = jax.random.key(7)
  one = masks(same, key)
  assert np.abs(one[0] - one[1]).max() > 1e-3  # one image, other noise
  np.testing.assert_array_equal(masks(same[:1], key)[0], one[0])
  assert np.abs(masks(same, jax.random.key(8))[0] - one[0]).max() > 1e-3


def test_kmeans_initial_slots_are_the_centroids_of_well_separated_clusters():
  # Farthest-point seeding picks one point of each of k clusters whose gaps
  # exceed their diameters, so one Lloyd step already gives the cluster means.
  rng = np.random.default_rng(2)
  centres = 10 * rng.standard_normal((2, 4, 6))
  labels = rng.integers(0, 4, (2, 60))
  labels[:, :4] = np.arange(4)  # every cluster has points
  points = np.take_along_axis(centres, labels[..., None], 1) + 0.1 * rng.standard_normal((2, 60, 6))
  with jax.enable_x64(True):
    found = np.asarray(slot_attention.kmeans_centres(jnp.asarray(points), 4, iterations=1))
  for b in range(2):
    means = np.stack([points[b][labels[b] == c].mean(0) for c in range(4)])
    order = [int(np.argmin(np.abs(means - f).sum(1))) for f in found[b]]
    assert sorted(order) == [0, 1, 2, 3]
    np.testing.assert_allclose(found[b], means[order], rtol=0, atol=1e-12)


def _slot_grads(test_config, **switches):
  """The test model's parameter gradients of the reconstruction loss, float64."""
  config = test_config("slot_attention")
  for key, value in switches.items():
    config.model.slot_attention[key] = value
  model = models.make_model(config).clone(dtype=jnp.float64)
  images = jax.random.uniform(jax.random.key(0), (2, 48, 64, 3), jnp.float64)
  params = jax.tree.map(lambda x: x.astype(jnp.float64), state_lib.init_variables(
      model, models.input_shape(config), config.seed)["params"])

  def loss(p):
    out, _ = model.apply({"params": p}, images, train=True, rngs={"slots": jax.random.key(3)})
    return jnp.mean((out - images) ** 2)
  return jax.grad(loss)(params)


def test_recipe_switches_route_the_gradient_as_their_papers_say(test_config):
  with jax.enable_x64(True):
    plain = _slot_grads(test_config)
    implicit = _slot_grads(test_config, implicit_grad=True)
    learned = _slot_grads(test_config, init="learned")
    kmeans = _slot_grads(test_config, init="kmeans")
  # The paper: the Gaussian's mean gets a gradient through every iteration.
  assert np.abs(plain["slots_mu"]).max() > 1e-8
  # Implicit differentiation: none reaches the initial slots, the rest learns.
  assert np.abs(implicit["slots_mu"]).max() == 0 == np.abs(implicit["slots_log_sigma"]).max()
  assert np.abs(implicit["slot_attention"]["project_q"]["kernel"]).max() > 1e-8
  # BO-QSA: the queries replace the Gaussian and learn straight through.
  assert "slots_mu" not in learned and np.abs(learned["slots_queries"]).max() > 1e-8
  # K-Means: no initial-slot parameters; the projection of the values it
  # clusters still learns (through the iterations' weighted means).
  assert not {"slots_mu", "slots_queries"} & set(kmeans)
  assert np.abs(kmeans["slot_attention"]["project_v"]["kernel"]).max() > 1e-8


def test_global_norm_clipping_bounds_the_update(test_config):
  # Adam normalises the update, so with b1 = b2 = 0 and a large eps the update
  # is lr * g / eps: clipping scales g to norm c, and the update with it.
  config = test_config("slot_attention")
  opt = config.optimizer
  opt.schedule, opt.warmup_steps, opt.learning_rate = "constant", 0, 1.0
  opt.b1, opt.b2, opt.eps, opt.weight_decay = 0.0, 0.0, 1e6, 0.0
  grads = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([8.0])}  # global norm 10
  params = jax.tree.map(jnp.zeros_like, grads)
  for clip, norm in ((0.0, 10.0), (2.0, 2.0), (50.0, 10.0)):
    opt.grad_clip_norm = clip
    tx = train_step.make_optimizer(config, 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) * 1e6 == pytest.approx(norm, rel=1e-5), clip


def test_warmup_exponential_is_the_papers_schedule(test_config):
  # lr * min(t / warmup, 1) * rate**(t / decay_steps): Adam's first update of a
  # lone parameter with gradient 1 is -lr(t) (b1 = b2 = 0, eps = 0), read at several t.
  config = test_config("slot_attention")
  opt = config.optimizer
  opt.learning_rate, opt.warmup_steps, opt.decay_steps, opt.decay_rate = 4e-4, 10_000, 100_000, 0.5
  opt.b1, opt.b2, opt.eps = 0.0, 0.0, 0.0
  tx = train_step.make_optimizer(config, 500_000)
  params = {"w": jnp.zeros(())}
  for t in (0, 2_500, 10_000, 50_000, 300_000):
    state = tx.init(params)
    state = jax.tree.map(lambda x: jnp.asarray(t, x.dtype) if x.dtype == jnp.int32 else x,
                         state)
    updates, _ = tx.update({"w": jnp.ones(())}, state, params)
    expected = 4e-4 * min(t / 10_000, 1) * 0.5 ** (t / 100_000)
    assert float(-updates["w"]) == pytest.approx(expected, rel=1e-5, abs=1e-12), t


def test_crop_and_resize_cuts_the_same_box_of_any_size():
  labels = np.zeros((240, 320), np.uint8)
  labels[100:140, 140:180] = 1  # inside the paper's crop
  labels[0:20, 0:20] = 2  # outside it
  example = {"image": np.stack([labels * 100] * 3, -1).astype(np.uint8), "labels": labels,
             "visibility": np.array([1, 1, 1] + [0] * 8, np.uint8), "index": 5}
  box = (29 / 240, 221 / 240, 64 / 320, 256 / 320)
  assert pipeline.crop_pixels(box, 240, 320) == (29, 221, 64, 256)
  assert pipeline.crop_pixels(box, 96, 128) == (12, 88, 26, 102)
  out = pipeline.crop_and_resize(example, box, 64, 64)
  assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
  assert out["labels"].shape == (64, 64) and out["index"] == 5
  # 192 -> 64 is a factor of 3: nearest keeps every third label of the crop.
  np.testing.assert_array_equal(out["labels"], labels[29:221, 64:256][1::3, 1::3])
  assert out["visibility"].tolist()[:3] == [1, 1, 0]
  with pytest.raises(ValueError, match="config.data.crop"):
    pipeline.crop_pixels((0.5, 0.2, 0, 1), 240, 320)


def test_the_paper_preset_is_the_published_recipe():
  import configs.slot_attention as slot_config  # pylint: disable=g-import-not-at-top
  config = slot_config.get_config("paper")
  sa = config.model.slot_attention
  assert (sa.num_slots, sa.num_iterations, sa.slot_size, sa.mlp_hidden) == (7, 3, 64, 128)
  assert (config.data.image_height, config.data.image_width) == (128, 128)
  assert pipeline.crop_pixels(config.data.crop, 240, 320) == (29, 221, 64, 256)
  assert config.data.real_config == "clevr6"
  assert (config.batch_size, config.num_train_steps) == (64, 500_000)
  assert sa.symmetric_input  # the paper's images are in [-1, 1]
  opt = config.optimizer
  assert (opt.learning_rate, opt.schedule, opt.warmup_steps) == (4e-4, "warmup_exponential",
                                                                 10_000)
  assert (opt.decay_rate, opt.decay_steps, opt.weight_decay) == (0.5, 100_000, 0.0)
  with pytest.raises(ValueError, match="unknown preset"):
    slot_config.get_config("papers")


def test_the_toy_preset_has_a_slot_per_object_and_crops_without_resampling():
  import configs.slot_attention as slot_config  # pylint: disable=g-import-not-at-top
  config = slot_config.get_config("toy")
  data, sa = config.data, config.model.slot_attention
  assert data.synthetic.distinct_colors and not data.synthetic.metal
  assert data.synthetic.zoom == 2.0 and sa.symmetric_input
  assert sa.num_slots == data.synthetic.max_objects + 1  # objects + the background
  assert config.eval.segmenters.slot_argmax.num_clusters == sa.num_slots
  top, bottom, left, right = pipeline.crop_pixels(data.crop, data.synthetic.height,
                                                  data.synthetic.width)
  assert (bottom - top, right - left) == (data.image_height, data.image_width)


# --- the data-parallel step: 4 devices equal 1 ---------------------------------

# As tests/test_steps.py derives them: the state is float64 (rounding ~1e-16,
# amplified far less than 1e7-fold here: no BatchNorm); the loss is a float32
# mean of N = 8 x 48 x 64 x 3 non-negative terms, within N * 2**-24 relatively.
_STATE_ATOL = 1e-9
_LOSS_RTOL = 8 * 48 * 64 * 3 * 2.0**-24


@pytest.mark.parametrize("variant", list(_SWITCH_VARIANTS))
def test_four_devices_step_like_one_device_over_the_same_global_batch(_device_runs, variant):
  # The cross-device parts: the pmean'd loss and the initial slots, drawn per
  # example by its row in the global batch (a per-device draw differs by O(1));
  # the K-Means initialiser is per example, clipping reads the global gradient.
  results = {}
  for devices in (1, 4):
    npz, child = _device_runs[variant, devices]
    result = child.result()
    assert result.returncode == 0, f"{devices} device(s):\n{result.stderr[-5000:]}"
    with np.load(npz) as f:
      results[devices] = {k: f[k] for k in f.files}
  one, four = results[1], results[4]
  assert int(four["device_count"]) == 4 and bool(four["replicated"])
  assert four[".params['slot_attention']['project_q']['kernel']"].dtype == np.float64
  np.testing.assert_allclose(four["metrics/loss"], one["metrics/loss"], rtol=_LOSS_RTOL)
  np.testing.assert_allclose(four["metrics/grad_norm"], one["metrics/grad_norm"],
                             rtol=_STATE_ATOL)
  state_keys = [k for k in one if k.startswith(".")]
  assert state_keys and state_keys == [k for k in four if k.startswith(".")]
  for key in state_keys:
    np.testing.assert_allclose(four[key], one[key], atol=_STATE_ATOL, rtol=0, err_msg=key)
  assert int(one[".step"]) == 3
  # The steps moved the parameters (warm-up: the first update is zero).
  config = _load_test_config()
  fresh = state_lib.create_state(config, train_step.make_optimizer(config, 1))
  moved = ".params['slot_attention']['project_q']['kernel']"
  assert np.abs(one[moved] - fresh.params["slot_attention"]["project_q"]["kernel"]).max() > 0
  if variant == "paper":  # the gradient reaches the initial slots' mean
    assert np.abs(one[".params['slots_mu']"] - fresh.params["slots_mu"]).max() > 0
  if variant == "learned_clipped":
    assert ".params['slots_queries']" in one and ".params['slots_mu']" not in one
    assert one["metrics/grad_norm"].min() > 0.01  # the clip acted on every step


def _load_test_config():
  import configs.slot_attention as slot_config  # pylint: disable=g-import-not-at-top
  return slot_config.get_config("test")


# --- training, resuming and scoring ---------------------------------------------


def _restore(config, workdir):
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  with checkpoints.make_manager(workdir, read_only=True) as manager:
    return checkpoints.restore(manager, state_lib.abstract_state(
        config, train_step.make_optimizer(config, 1)), sharding.make_mesh())


@pytest.fixture(scope="module")
def trained_slots(tmp_path_factory, test_config):
  """slot_attention:test trained for 6 steps (a step budget: epoch 2 stops part-way)."""
  config = test_config("slot_attention")
  config.num_train_steps = 6
  workdir = str(tmp_path_factory.mktemp("slots") / "straight")
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _resume_and_compare(config, straight, resumed):
  """Trains `config` to step 3 in `resumed`, resumes it to its budget, and
  compares the parameters with the straight run's."""
  first = config.copy_and_resolve_references()
  first.num_train_steps = 3
  train.train_and_evaluate(first, resumed)
  assert int(_restore(config, resumed).step) == 3
  train.train_and_evaluate(config, resumed)  # resumes from step 3: skips 3 batches
  a, b = _restore(config, resumed), _restore(config, straight)
  assert int(a.step) == config.num_train_steps
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params),
                          jax.tree.leaves(b.params)):
    # Equal bit for bit in practice; a wrong batch or a lost update moves ~1e-3.
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # trains
def test_a_step_budget_stops_part_way_and_a_resumed_run_equals_the_straight_one(
    trained_slots, tmp_path):
  config, straight = trained_slots
  assert int(_restore(config, straight).step) == 6
  _resume_and_compare(config, straight, str(tmp_path / "resumed"))


@pytest.mark.slow  # trains
def test_a_resumed_run_with_the_recipe_switches_equals_the_straight_one(test_config, tmp_path):
  # Learned queries add parameters, clipping a state to the optimizer's chain:
  # both must come back from a checkpoint as they were saved.
  config = test_config("slot_attention")
  config.num_train_steps = 5
  config.model.slot_attention.init = "learned"
  config.optimizer.grad_clip_norm = 0.01
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  _resume_and_compare(config, straight, str(tmp_path / "resumed"))


def _write_samples(path):
  from clevr_jax.data import official  # pylint: disable=g-import-not-at-top
  from tools import real_samples  # pylint: disable=g-import-not-at-top
  official.write_records(path, real_samples.sample_examples(SAMPLES, (0, 1), None))


@pytest.mark.slow  # trains
def test_evaluation_scores_the_slot_masks_by_argmax_on_an_eval_file_of_another_size(
    trained_slots, tmp_path):
  config, workdir = trained_slots
  config = config.copy_and_resolve_references()
  config.eval.batch_size = 1
  config.eval.kmeans.num_restarts, config.eval.kmeans.max_iter = 1, 20
  config.eval.segmenter_names = ("kmeans", "slot_argmax")
  # The two real 240x320 records, shrunk to the model's 48x64.
  path = str(tmp_path / "samples.tfrecords")
  _write_samples(path)
  config.data.eval_file = path
  out = str(tmp_path / "evaluated")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(workdir, out, ignore=shutil.ignore_patterns(".lock"))
  results = evaluation.evaluate(config, out)
  assert results["num_images"] == 2
  table = results["segmenters"]
  assert set(table["kmeans"]) == set(config.eval.taps)
  assert set(table["slot_argmax"]) == {"attention", "slot_masks"}
  for row in table["slot_argmax"].values():
    assert 0 <= row["poster_miou"] <= 1 and -1 <= row["fg_ari"] <= 1
  with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
    markdown = f.read()
  assert "## segmenter `slot_argmax`" in markdown and "| slot_masks |" in markdown
  assert "argmax over the slots" in markdown


@pytest.mark.slow  # trains, and starts a child
def test_the_learning_curve_tool_scores_every_checkpoint(trained_slots, tmp_path, data_dir,
                                                         run_python):
  config, workdir = trained_slots
  import shutil  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(".lock"))
  result = run_python(["-m", "tools.slot_curve",
                       f"--config={REPO_ROOT}/configs/slot_attention.py:test",
                       f"--config.data.data_dir={data_dir}", f"--workdir={copy}"])
  assert result.returncode == 0, result.stderr[-5000:]
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(copy, "curve.json"), encoding="utf-8") as f:
    rows = json.load(f)
  from clevr_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  with checkpoints.make_manager(copy, read_only=True) as manager:
    steps = sorted(manager.all_steps())
  assert steps[-1] == 6 and len(steps) >= 2
  assert [(r["step"], r["tap"]) for r in rows] == [
      (s, t) for s in steps for t in ("slot_masks", "attention")]
  assert all(0 <= r["poster_miou"] <= 1 for r in rows)


def test_the_pipeline_crops_dataset_and_eval_file_examples_alike(test_config, tmp_path):
  # The crop in tf.data's graph (the TFDS split) and eagerly (an eval file's
  # records) is the same function: the same box of a 240x320 and a 48x64 scene.
  config = test_config("slot_attention")
  config.data.crop = (29 / 240, 221 / 240, 64 / 320, 256 / 320)
  config.data.image_height = config.data.image_width = 32
  config.data.synthetic.height, config.data.synthetic.width = 48, 64  # the :test scenes
  stored = next(pipeline.Split(config, "train").train_batches(0))
  assert stored["image"].shape[1:] == (32, 32, 3) and stored["labels"].shape[1:] == (32, 32)
  for labels, visibility in zip(stored["labels"], stored["visibility"]):
    assert set(np.flatnonzero(visibility)) == set(np.unique(labels))
  path = str(tmp_path / "samples.tfrecords")
  _write_samples(path)
  config.data.eval_file = path
  batch = next(pipeline.Split(config, "test").eval_batches())
  with np.load(os.path.join(SAMPLES, "sample_0.npz")) as sample:
    from clevr_jax import schema  # pylint: disable=g-import-not-at-top
    full = {"image": sample["image"], "labels": schema.masks_to_labels(sample["mask"]),
            "visibility": np.ones(schema.MAX_SLOTS, np.float32)}
  expected = pipeline.crop_and_resize(full, config.data.crop, 32, 32)
  assert batch["image"].shape[1:] == (32, 32, 3)
  np.testing.assert_array_equal(batch["image"][0], expected["image"])
  np.testing.assert_array_equal(batch["labels"][0], expected["labels"])
  assert set(np.flatnonzero(batch["visibility"][0])) == set(np.unique(expected["labels"]))
