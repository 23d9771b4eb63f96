"""The poster's U-Net and train step in PyTorch: the reference `train_benchmark` times.

The same network as `clevr_jax.models.UNet` (skip on): (BatchNorm -> 3x3 conv
-> ReLU) x 2 per block, BatchNorm before every conv, 2x2 max-pool down, 2x2
stride-2 transposed conv up, the skip concatenated after the upsampled map,
a 3x3 output conv; AdamW (lr 1e-2, weight decay 1e-2) on the per-pixel MSE
against the input. Layout NCHW (channels-last memory format optional);
bfloat16 through autocast, parameters float32, as on the JAX side.

PyTorch is an optional, benchmark-only dependency (`pip install
'clevr_jax[torch]'`); importing this module without it raises an ImportError
that says so. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as e:
  raise ImportError(
      'the PyTorch reference needs PyTorch, an optional benchmark-only '
      "dependency: pip install 'clevr_jax[torch]' (a CPU-only build: pip "
      'install torch --index-url https://download.pytorch.org/whl/cpu)') from e
import jax
import jax.numpy as jnp
import numpy as np

from clevr_jax import models

_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.1  # PyTorch's convention; flax's 0.9


class ConvBlock(nn.Module):
  """(BatchNorm -> 3x3 conv -> ReLU) twice."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(in_channels, eps=_BN_EPSILON, momentum=_BN_MOMENTUM)
    self.conv1 = nn.Conv2d(in_channels, features, 3, padding=1)
    self.norm2 = nn.BatchNorm2d(features, eps=_BN_EPSILON, momentum=_BN_MOMENTUM)
    self.conv2 = nn.Conv2d(features, features, 3, padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.conv1(self.norm1(x)))
    return F.relu(self.conv2(self.norm2(x)))


class UNet(nn.Module):
  """Module names follow the flax network's ('enc1', 'up1', 'dec1', ...)."""

  def __init__(self, in_channels: int = 3, out_channels: int = 3,
               base_width: int = 8, depth: int = 4, skip: bool = True):
    super().__init__()
    self.depth = depth
    self.skip = skip
    self.blocks = nn.ModuleDict()
    self.ups = nn.ModuleDict()
    channels = in_channels
    for i in range(1, depth + 1):
      self.blocks[f'enc{i}'] = ConvBlock(channels, base_width * 2**(i - 1))
      channels = base_width * 2**(i - 1)
    self.blocks['bottleneck'] = ConvBlock(channels, base_width * 2**depth)
    channels = base_width * 2**depth
    for j in range(1, depth + 1):
      features = base_width * 2**(depth - j)
      self.ups[f'up{j}'] = nn.ConvTranspose2d(channels, features, 2, stride=2)
      self.blocks[f'dec{j}'] = ConvBlock(features * (2 if skip else 1), features)
      channels = features
    self.output = nn.Conv2d(channels, out_channels, 3, padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.taps(x)['output']

  def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every named activation, as the flax network's taps: 'input', 'enc1'..,
    'bottleneck', 'dec1'.., 'output' (NCHW)."""
    taps = {'input': x}
    skips = []
    h = x
    for i in range(1, self.depth + 1):
      if i > 1:
        h = F.max_pool2d(h, 2)
      h = taps[f'enc{i}'] = self.blocks[f'enc{i}'](h)
      skips.append(h)
    h = taps['bottleneck'] = self.blocks['bottleneck'](F.max_pool2d(h, 2) if self.depth else h)
    for j in range(1, self.depth + 1):
      h = self.ups[f'up{j}'](h)
      if self.skip:
        h = torch.cat([h, skips[-j]], dim=1)
      h = taps[f'dec{j}'] = self.blocks[f'dec{j}'](h)
    taps['output'] = self.output(h)
    return taps


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def jax_param_count(in_channels: int = 3, out_channels: int = 3,
                    base_width: int = 8, depth: int = 4, skip: bool = True) -> int:
  """Trainable scalars of the flax network, from shapes only (nothing computed)."""
  model = models.UNet(out_channels, base_width=base_width, depth=depth, skip=skip)
  size = 2**depth
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, size, size, in_channels)), train=False))
  return models.count_params(variables['params'])


def build_unet(in_channels: int = 3, out_channels: int = 3, base_width: int = 8,
               depth: int = 4, skip: bool = True) -> UNet:
  """The network, checked to have exactly the flax network's parameter count."""
  model = UNet(in_channels, out_channels, base_width, depth, skip)
  ours = count_params(model)
  theirs = jax_param_count(in_channels, out_channels, base_width, depth, skip)
  assert ours == theirs, f'PyTorch U-Net has {ours} parameters, the JAX one {theirs}'
  return model


def load_flax_variables(model: UNet, params: Any, batch_stats: Any = None) -> None:
  """Copies a flax UNet's variables into `model` (layouts converted).

  Conv kernels HWIO -> OIHW. Transposed-conv kernels (kh, kw, in, out) -> (in,
  out, kh, kw), spatially flipped: flax's ConvTranspose (transpose_kernel=False)
  correlates the dilated input with the kernel, PyTorch scatters it.
  """
  def tensor(x, transpose=None, flip=False):
    x = np.array(x, np.float32)  # a writable copy: jax arrays are read-only
    if flip:
      x = x[::-1, ::-1]
    if transpose:
      x = x.transpose(transpose)
    return torch.from_numpy(np.ascontiguousarray(x))

  def conv(module, p):
    module.weight.data.copy_(tensor(p['kernel'], (3, 2, 0, 1)))
    module.bias.data.copy_(tensor(p['bias']))

  with torch.no_grad():
    for name, block in model.blocks.items():
      for i in (1, 2):
        norm = getattr(block, f'norm{i}')
        norm.weight.data.copy_(tensor(params[name][f'norm{i}']['scale']))
        norm.bias.data.copy_(tensor(params[name][f'norm{i}']['bias']))
        if batch_stats is not None:
          norm.running_mean.copy_(tensor(batch_stats[name][f'norm{i}']['mean']))
          norm.running_var.copy_(tensor(batch_stats[name][f'norm{i}']['var']))
        conv(getattr(block, f'conv{i}'), params[name][f'conv{i}'])
    for name, up in model.ups.items():
      up.weight.data.copy_(tensor(params[name]['kernel'], (2, 3, 0, 1), flip=True))
      up.bias.data.copy_(tensor(params[name]['bias']))
    conv(model.output, params['output'])


def export_taps(model: UNet, images: np.ndarray, folder: str, taps: tuple[str, ...],
                batch: int = 16) -> None:
  """Writes `taps` of `images` [n, H, W, C] (float32 in [0, 1]) as features for
  `--mode=score_features`: folder/<tap>/<index>.npy, [h, w, c] float32 each
  (the network in eval mode: BatchNorm's running statistics)."""
  import os  # pylint: disable=g-import-not-at-top
  model.eval()
  for tap in taps:
    os.makedirs(os.path.join(folder, tap), exist_ok=True)
  with torch.no_grad():
    for start in range(0, len(images), batch):
      x = torch.from_numpy(np.array(images[start:start + batch], np.float32)).permute(0, 3, 1, 2)
      out = model.taps(x)
      for tap in taps:
        maps = out[tap].permute(0, 2, 3, 1).numpy().astype(np.float32)
        for offset, features in enumerate(maps):
          np.save(os.path.join(folder, tap, f'{start + offset}.npy'), features)


def default_device() -> torch.device:
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def describe_device() -> str:
  device = default_device()
  name = (torch.cuda.get_device_name(device) if device.type == 'cuda'
          else f'CPU, {torch.get_num_threads()} threads')
  return f'torch {torch.__version__}, {name}'


def make_train_step(model: nn.Module, *, dtype: str = 'float32',
                    learning_rate: float = 1e-2, weight_decay: float = 1e-2
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
  """One AdamW step on the MSE of reconstructing the batch; returns the loss."""
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                weight_decay=weight_decay)
  device_type = next(model.parameters()).device.type
  autocast = dtype == 'bfloat16'

  def step(images: torch.Tensor) -> torch.Tensor:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
      output = model(images)
    loss = F.mse_loss(output.float(), images)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step


@dataclasses.dataclass
class Runner:
  """`run(n)` does n steps on a fixed random batch and waits for the device."""
  step: Callable[[torch.Tensor], torch.Tensor]
  images: torch.Tensor
  warmup_s: float = 0.0

  def release(self) -> None:
    """Frees the model and batch and hands cached GPU memory back (to JAX)."""
    self.step = self.images = None
    if torch.cuda.is_available():
      torch.cuda.empty_cache()

  def run(self, num_steps: int) -> float:
    loss = None
    for _ in range(num_steps):
      loss = self.step(self.images)
    if self.images.device.type == 'cuda':
      torch.cuda.synchronize(self.images.device)
    return float('nan') if loss is None else float(loss)


def make_runner(*, base_width: int = 8, depth: int = 4, dtype: str = 'float32',
                batch: int = 10, height: int = 240, width: int = 320,
                channels: int = 3, device: torch.device | None = None,
                channels_last: bool | None = None, warmup_steps: int = 2,
                seed: int = 0) -> Runner:
  """A model, optimizer and random batch on `device`, warmed up.

  The warm-up steps (cuDNN's autotuning under `cudnn.benchmark`, allocator
  growth) are timed and reported apart, like JAX's compile.
  """
  device = device or default_device()
  if channels_last is None:
    channels_last = device.type == 'cuda'
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(seed)
  model = build_unet(channels, channels, base_width, depth).to(device)
  images = torch.rand(batch, channels, height, width, device=device)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  runner = Runner(make_train_step(model, dtype=dtype), images)
  start = time.perf_counter()
  runner.run(warmup_steps)
  runner.warmup_s = time.perf_counter() - start
  return runner
