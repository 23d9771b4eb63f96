"""Tests of clevr_jax.models: taps, parameter counts, BatchNorm modes, dtypes, training."""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clevr_jax import models

H, W = 32, 48  # divisible by 2**4, small enough for a fast CPU test
# XLA on CPU takes ~2 s to compile each threefry draw (one per parameter shape,
# ~40 s for this network); the 'rbg' generator compiles far faster.
KEY = jax.random.key(0, impl='rbg')


def _images(seed=0, n=2, c=3):
  return jax.random.uniform(jax.random.key(seed), (n, H, W, c))


# Jitted: one compilation per network instead of one per primitive, which keeps
# the file fast on a CPU.
@functools.cache
def _init(model):
  return jax.jit(functools.partial(model.init, train=False))


@functools.cache
def _apply(model):
  return jax.jit(model.apply, static_argnames=('train', 'taps', 'mutable'))


@pytest.fixture(scope='module')
def unet_vars():
  return _init(models.UNet(3))(KEY, _images())


@pytest.fixture(scope='module')
def ae_vars():
  return _init(models.UNet(3, skip=False))(KEY, _images())


# --- taps --------------------------------------------------------------------


def _expected_tap_shapes(base=8, depth=4, cin=3, cout=3, n=2):
  shapes = {'input': (n, H, W, cin)}
  for i in range(1, depth + 1):
    s = 2**(i - 1)
    shapes[f'enc{i}'] = (n, H // s, W // s, base * s)
  shapes['bottleneck'] = (n, H // 2**depth, W // 2**depth, base * 2**depth)
  for j in range(1, depth + 1):
    s = 2**(depth - j)
    shapes[f'dec{j}'] = (n, H // s, W // s, base * s)
  shapes['output'] = (n, H, W, cout)
  return shapes


def test_tap_names():
  assert models.TAP_NAMES == ('input', 'enc1', 'enc2', 'enc3', 'enc4', 'bottleneck',
                              'dec1', 'dec2', 'dec3', 'dec4', 'output')
  assert models.tap_names(2) == ('input', 'enc1', 'enc2', 'bottleneck', 'dec1', 'dec2',
                                 'output')


@pytest.mark.parametrize('skip', [True, False])
def test_tap_shapes(skip, unet_vars, ae_vars):
  variables = unet_vars if skip else ae_vars
  x = _images()
  out, taps = _apply(models.UNet(3, skip=skip))(variables, x, train=False,
                                              taps=models.TAP_NAMES)
  expected = _expected_tap_shapes()
  assert {k: v.shape for k, v in taps.items()} == expected
  assert out.shape == (2, H, W, 3)
  assert all(v.dtype == jnp.float32 for v in taps.values())
  np.testing.assert_array_equal(taps['input'], x)
  np.testing.assert_array_equal(taps['output'], out)
  # dec4 is the last decoder block (8 channels, full size), not enc1 as in the original.
  assert not np.allclose(taps['dec4'], taps['enc1'])


def test_taps_only_when_requested(unet_vars):
  model = models.UNet(3)
  _, taps = _apply(model)(unet_vars, _images(), train=False)
  assert taps == {}
  # A single name is read as one tap, not as a sequence of characters.
  _, taps = _apply(model)(unet_vars, _images(), train=False, taps='bottleneck')
  assert list(taps) == ['bottleneck']


SMALL = models.UNet(3, base_width=4, depth=2, dropout_rate=0.5)


@pytest.fixture(scope='module')
def small_setup():
  x = jax.random.uniform(jax.random.key(7), (2, 12, 8, 3))
  return x, _init(SMALL)(KEY, x)


def test_taps_other_depth(small_setup):
  x, variables = small_setup
  _, taps = _apply(SMALL)(variables, x, train=False, taps=models.tap_names(2))
  assert taps['enc2'].shape == (2, 6, 4, 8)
  assert taps['bottleneck'].shape == (2, 3, 2, 16)
  assert taps['dec1'].shape == (2, 6, 4, 8)
  assert taps['dec2'].shape == (2, 12, 8, 4)


def test_unknown_tap_raises(unet_vars):
  with pytest.raises(ValueError, match='enc5.*valid names'):
    _apply(models.UNet(3))(unet_vars, _images(), train=False, taps=('enc5',))


def test_non_divisible_size_raises():
  with pytest.raises(ValueError, match='divisible by 2\\*\\*depth = 16'):
    models.UNet(3).init(jax.random.key(0), jnp.zeros((1, 40, 48, 3)), train=False)


# --- parameter counts, by hand from the architecture ---------------------------


def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _block(cin, c):
  """(params, BatchNorm channels) of (BN -> 3x3 conv -> ReLU) x2."""
  return 2 * cin + _conv(3, cin, c) + 2 * c + _conv(3, c, c), cin + c


def _hand_count(cin, cout, skip, base=8, depth=4):
  """(params, BatchNorm channels) of the whole network."""
  widths = [base * 2**i for i in range(depth + 1)]  # enc1..encD, bottleneck
  blocks = [_block(cin, widths[0])]
  blocks += [_block(widths[i - 1], widths[i]) for i in range(1, depth + 1)]
  params = 0
  for j in range(depth, 0, -1):  # decoder: from widths[j] down to widths[j-1]
    c = widths[j - 1]
    params += _conv(2, widths[j], c)  # stride-2 transposed conv
    blocks.append(_block(2 * c if skip else c, c))
  params += sum(p for p, _ in blocks) + _conv(3, widths[0], cout)
  return params, sum(c for _, c in blocks)


@pytest.mark.parametrize('skip, cout, expected', [
    (True, 3, 487_489),   # the poster's U-Net
    (False, 3, 438_289),  # the poster's Auto-Encoder
    (True, 4, 487_562),   # the supervised head
])
def test_param_count(skip, cout, expected):
  model = models.UNet(cout, skip=skip)
  init = functools.partial(model.init, train=False)
  shapes = jax.eval_shape(init, KEY, jnp.zeros((1, H, W, 3)))
  params, bn_channels = _hand_count(3, cout, skip)
  assert params == expected
  assert models.count_params(shapes['params']) == expected
  # Running mean and variance are state, not parameters: two per normalised channel.
  assert models.count_params(shapes['batch_stats']) == 2 * bn_channels


def test_param_dtype_float32(unet_vars):
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(unet_vars))


# --- skip switch -----------------------------------------------------------------


def test_autoencoder_decoder_has_no_skip_inputs(unet_vars, ae_vars):
  for j, c in enumerate((64, 32, 16, 8), start=1):
    unet_in = unet_vars['params'][f'dec{j}']['conv1']['kernel'].shape[2]
    ae_in = ae_vars['params'][f'dec{j}']['conv1']['kernel'].shape[2]
    assert (unet_in, ae_in) == (2 * c, c)


def _output_with_bottleneck(model, variables, x, bottleneck):
  """Output on x, with the bottleneck block's result replaced by `bottleneck`."""

  def swap(next_fun, args, kwargs, context):
    if context.module.name == 'bottleneck' and context.method_name == '__call__':
      return bottleneck
    return next_fun(*args, **kwargs)

  # A fresh jit, traced inside the interceptor (a cached trace would bypass it).
  with nn.intercept_methods(swap):
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return out


@pytest.mark.parametrize('skip', [True, False])
def test_only_unet_sees_encoder_past_bottleneck(skip, unet_vars, ae_vars):
  """With x2's bottleneck swapped into x1's pass, only the U-Net still sees x1."""
  variables = unet_vars if skip else ae_vars
  model = models.UNet(3, skip=skip)
  x1, x2 = _images(1), _images(2)
  out2, taps2 = _apply(model)(variables, x2, train=False, taps=models.TAP_NAMES)
  mixed = _output_with_bottleneck(model, variables, x1, taps2['bottleneck'])
  if skip:
    assert np.abs(mixed - out2).max() > 1e-3
  else:
    np.testing.assert_allclose(mixed, out2, atol=1e-6)


# --- BatchNorm train / eval --------------------------------------------------------


def test_batchnorm_train_vs_eval(unet_vars):
  model = models.UNet(3)
  x = _images(3) * 2.0 + 0.5  # statistics far from the initial (0, 1)
  (out_train, _), updates = _apply(model)(unet_vars, x, train=True,
                                          mutable=('batch_stats',))
  stats = updates['batch_stats']['enc1']['norm1']  # normalises the input itself
  np.testing.assert_allclose(stats['mean'], 0.1 * np.mean(x, axis=(0, 1, 2)), rtol=1e-4)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * np.var(x, axis=(0, 1, 2)),
                             rtol=1e-4)
  new_vars = {'params': unet_vars['params'], 'batch_stats': updates['batch_stats']}
  out_eval, _ = _apply(model)(new_vars, x, train=False)
  assert np.abs(out_eval - out_train).max() > 1e-3
  # Eval is deterministic and leaves no state to update.
  out_eval2, _ = _apply(model)(new_vars, x, train=False)
  np.testing.assert_array_equal(out_eval, out_eval2)


def test_dropout_only_in_train(small_setup):
  x, variables = small_setup
  a, _ = _apply(SMALL)(variables, x, train=False)
  b, _ = _apply(SMALL)(variables, x, train=False)
  np.testing.assert_array_equal(a, b)
  train = lambda key: _apply(SMALL)(variables, x, train=True, mutable=('batch_stats',),
                                    rngs={'dropout': key})[0][0]
  c, d = train(jax.random.key(1, impl='rbg')), train(jax.random.key(2, impl='rbg'))
  assert c.shape == a.shape and np.abs(c - d).max() > 1e-3


def test_batchnorm_statistics_across_devices(small_setup):
  """With axis_name, BatchNorm over a batch split across devices equals one device."""
  x, variables = small_setup  # SMALL's variables fit the same network without dropout
  single = models.UNet(3, base_width=4, depth=2)
  parallel = models.UNet(3, base_width=4, depth=2, axis_name='batch')
  (out, _), upd = _apply(single)(variables, x, train=True, mutable=('batch_stats',))
  split = jax.vmap(
      lambda xs: parallel.apply(variables, xs, train=True, mutable=['batch_stats']),
      axis_name='batch')
  (out_p, _), upd_p = jax.jit(split)(x.reshape(2, 1, *x.shape[1:]))
  np.testing.assert_allclose(out_p.reshape(out.shape), out, rtol=1e-3, atol=1e-4)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5),
      upd_p['batch_stats'], upd['batch_stats'])


# --- compute dtype -------------------------------------------------------------------


def test_bfloat16_compute(unet_vars):
  x = _images(4)
  out32, _ = _apply(models.UNet(3))(unet_vars, x, train=False)
  model16 = models.UNet(3, dtype=jnp.bfloat16)
  variables16 = jax.eval_shape(_init(model16), KEY, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables16))
  out16, taps = _apply(model16)(unet_vars, x, train=False, taps=('bottleneck',))
  assert out16.dtype == jnp.float32 and taps['bottleneck'].dtype == jnp.float32
  # bfloat16 keeps 8 significant bits: each rounding errs by at most u = 2**-8 of
  # the value. This network rounds about 90 times on the way to an output (23
  # convolutions, each rounding its input, kernel and output, most after a
  # BatchNorm that rounds too); as independent errors they add like a random
  # walk, to sqrt(90) * u = 3.7% of the output's scale. Measured: 0.9% (and 0.09%
  # in float16, u = 2**-11: the error follows u). Above zero: it computes in bfloat16.
  scale = np.abs(out32).max()
  error = np.abs(out16 - out32).max()
  assert 0 < error < np.sqrt(90) * 2.0**-8 * scale


# --- config ---------------------------------------------------------------------------


def test_build_model():
  config = ml_collections.ConfigDict()
  config.model = dict(skip=False, base_width=4, depth=3, dropout_rate=0.0,
                      bn_momentum=0.9, dtype='bfloat16', out_channels=1)
  model = models.build_model(config, axis_name='batch')
  assert model == models.UNet(1, base_width=4, depth=3, skip=False, bn_momentum=0.9,
                              axis_name='batch', dtype=jnp.bfloat16)
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match='dtype'):
    models.build_model(config)


@pytest.mark.slow  # a child interpreter
def test_no_tensorflow_import():
  code = ('import sys; import clevr_jax.models, clevr_jax.training.losses; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True)


# --- training --------------------------------------------------------------------------


def test_reconstruction_loss_decreases(small_setup):
  # A small network: compiling the default one's gradient alone takes ~20 s here.
  x, variables = small_setup
  model = models.UNet(3, base_width=4, depth=2)
  tx = optax.adamw(1e-2, weight_decay=1e-2)
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(p):
      (out, _), upd = model.apply({'params': p, 'batch_stats': batch_stats}, x,
                                  train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(out - x)), upd['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for _ in range(8):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


# --- attention at the bottleneck, embedding head -----------------------------


def _attention_params(c, mlp_ratio=2):
  """Two LayerNorms, q/k/v/out projections with biases, a two-layer MLP."""
  return 2 * 2 * c + 4 * (c * c + c) + (c * mlp_ratio * c + mlp_ratio * c) + (
      mlp_ratio * c * c + c)


def test_attention_and_embedding_head_add_exactly_their_parameters():
  base = dict(base_width=4, depth=2)
  x = jnp.zeros((1, 16, 32, 3))  # 32 tokens at the bottleneck, not 16 = its channels,
  # which flax's attention would take for a misplaced mask and warn about
  count = lambda m: models.count_params(jax.eval_shape(
      functools.partial(m.init, train=False), KEY, x)['params'])
  plain = count(models.UNet(3, **base))
  c = 4 * 2**2  # bottleneck channels
  assert count(models.UNet(3, attention_blocks=2, **base)) == plain + 2 * _attention_params(c)
  # 1x1 conv head on dec1 (8 channels) to 5 dims.
  assert count(models.UNet(3, embedding_dim=5, embedding_tap='dec1', **base)) == (
      plain + 8 * 5 + 5)


def test_embedding_is_a_tap_by_name():
  model = models.UNet(3, base_width=4, depth=2, embedding_dim=6, embedding_tap='dec1')
  x = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3))
  variables = _init(model)(KEY, x)
  _, taps = _apply(model)(variables, x, train=False, taps=('embedding', 'dec1'))
  assert taps['embedding'].shape == (2, 8, 12, 6)
  kernel = variables['params']['embedding_head']['kernel'][0, 0]
  bias = variables['params']['embedding_head']['bias']
  np.testing.assert_allclose(taps['embedding'], taps['dec1'] @ kernel + bias, rtol=1e-5,
                             atol=1e-5)
  config = ml_collections.ConfigDict({'model': {'depth': 2, 'embedding_dim': 6}})
  assert models.config_tap_names(config)[-1] == 'embedding'
  assert models.tap_names(2) == models.config_tap_names(
      ml_collections.ConfigDict({'model': {'depth': 2}}))
  # Without a head the name is unknown, as any other wrong tap.
  with pytest.raises(ValueError, match='embedding.*valid names'):
    _apply(SMALL)(_init(SMALL)(KEY, x), x, train=False, taps=('embedding',))
  with pytest.raises(ValueError, match="embedding_tap='enc9'"):
    models.UNet(3, depth=2, embedding_dim=4, embedding_tap='enc9').init(
        KEY, x, train=False)


def test_attention_mixes_the_bottleneck_globally():
  # depth 1: a bottleneck pixel sees about 7 input pixels around it through the
  # convolutions; a change in the opposite corner reaches it only by attention.
  x1 = jax.random.uniform(jax.random.key(2), (1, 16, 16, 3))
  x2 = x1.at[0, 0, 0].set(1.0 - x1[0, 0, 0])
  for blocks, reaches in ((0, False), (1, True)):
    model = models.UNet(3, base_width=4, depth=1, attention_blocks=blocks)
    variables = _init(model)(KEY, x1)
    far = [_apply(model)(variables, x, train=False, taps=('bottleneck',))[1]['bottleneck']
           [0, -1, -1] for x in (x1, x2)]
    assert (not np.allclose(far[0], far[1], rtol=0, atol=1e-7)) == reaches
