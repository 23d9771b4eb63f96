r"""Where XLA:CPU loses to PyTorch: each 3x3 convolution of the U-Net, in three parts.

  python -m clevr_jax.benchmarks.conv_benchmark [--conv_batch=2] [--conv_height=240]
      [--conv_width=320] [--conv_base_width=8] [--conv_depth=4] [--conv_repeats=7]

(The flags carry a prefix: the other benchmarks, imported beside it in one
process by the tests, define --batch and friends.)

For every 3x3 convolution of the poster's U-Net (`unet_layers`: encoder,
bottleneck, decoder after the skip's concatenation, output), times its forward
pass, its input gradient (dx) and its filter gradient (dw), float32, as JAX
computes them (`lax.conv_general_dilated` in flax's NHWC/HWIO layout, and the
transposed convolutions JAX's autodiff makes of it, each jitted alone) and as
PyTorch does (`conv2d`, `grad.conv2d_input`, `grad.conv2d_weight`, NCHW, when
PyTorch is installed). Prints the best of `--conv_repeats` runs in ms per part and
the totals; the train step's gap (docs/benchmarks.md) is read off here.
TensorFlow-free.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clevr_jax.benchmarks import train_benchmark as tb

_BATCH = flags.DEFINE_integer("conv_batch", 2, "Images per call.")
_HEIGHT = flags.DEFINE_integer("conv_height", 240, "Image height.")
_WIDTH = flags.DEFINE_integer("conv_width", 320, "Image width.")
_BASE_WIDTH = flags.DEFINE_integer("conv_base_width", 8, "Channels of the first block.")
_DEPTH = flags.DEFINE_integer("conv_depth", 4, "Down-samplings.")
_REPEATS = flags.DEFINE_integer("conv_repeats", 7, "Timed runs per part (the best is kept).")


def unet_layers(height: int, width: int, base_width: int = 8, depth: int = 4,
                in_channels: int = 3, out_channels: int = 3
                ) -> list[tuple[int, int, int, int]]:
  """(height, width, in channels, out channels) of each 3x3 convolution of
  `models.UNet` (skip on), in forward order."""
  layers = []
  channels = in_channels
  for level in range(depth + 1):  # the encoder's blocks, then the bottleneck
    features = base_width * 2**level
    size = (height // 2**level, width // 2**level)
    layers += [(*size, channels, features), (*size, features, features)]
    channels = features
  for level in reversed(range(depth)):  # up-sampled, concatenated with the skip
    features = base_width * 2**level
    size = (height // 2**level, width // 2**level)
    layers += [(*size, 2 * features, features), (*size, features, features)]
  layers.append((height, width, base_width, out_channels))
  return layers


def best_ms(run: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(run())  # compiles (JAX) or warms up (PyTorch)
  return 1e3 * min(tb.step_seconds(lambda _: jax.block_until_ready(run()), 1, repeats))


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_parts(x: jax.Array, kernel: jax.Array) -> dict[str, Callable[[], Any]]:
  """The three parts as JAX's autodiff computes them, each jitted alone."""
  cotangent = _conv(x, kernel)
  fwd = jax.jit(_conv)
  dx = jax.jit(lambda x, k, g: jax.vjp(lambda x: _conv(x, k), x)[1](g)[0])
  dw = jax.jit(lambda x, k, g: jax.vjp(lambda k: _conv(x, k), k)[1](g)[0])
  return {"fwd": lambda: fwd(x, kernel), "dx": lambda: dx(x, kernel, cotangent),
          "dw": lambda: dw(x, kernel, cotangent)}


def torch_parts(x: np.ndarray, kernel: np.ndarray) -> dict[str, Callable[[], Any]] | None:
  """The same three parts in PyTorch (NCHW), or None without PyTorch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  kt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
  functional, grad = torch.nn.functional, torch.nn.grad
  with torch.no_grad():
    cotangent = functional.conv2d(xt, kt, padding=1)
  no_grad = torch.no_grad()  # as a decorator: each call runs without autograd
  return {"fwd": no_grad(lambda: functional.conv2d(xt, kt, padding=1)),
          "dx": no_grad(lambda: grad.conv2d_input(xt.shape, kt, cotangent, padding=1)),
          "dw": no_grad(lambda: grad.conv2d_weight(xt, kt.shape, cotangent, padding=1))}


def run(batch: int, height: int, width: int, base_width: int = 8, depth: int = 4,
        repeats: int = 7) -> list[dict[str, Any]]:
  """One row per layer: its shape and {framework/part: best ms}."""
  rows = []
  rng = np.random.default_rng(0)
  for h, w, cin, cout in unet_layers(height, width, base_width, depth):
    x = rng.normal(size=(batch, h, w, cin)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    row = {"layer": f"{h}x{w} {cin}->{cout}"}
    for part, call in jax_parts(jnp.asarray(x), jnp.asarray(kernel)).items():
      row[f"jax {part}"] = best_ms(call, repeats)
    for part, call in (torch_parts(x, kernel) or {}).items():
      row[f"torch {part}"] = best_ms(call, repeats)
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  columns = [c for c in rows[0] if c != "layer"]
  lines = ["| layer | " + " | ".join(f"{c} ms" for c in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for row in rows:
    lines.append(f"| {row['layer']} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
  lines.append("| total | " + " | ".join(f"{sum(r[c] for r in rows):.1f}" for c in columns)
               + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = run(_BATCH.value, _HEIGHT.value, _WIDTH.value, _BASE_WIDTH.value, _DEPTH.value,
             _REPEATS.value)
  print(f"3x3 convolutions of the U-Net, batch {_BATCH.value}, {_HEIGHT.value}x{_WIDTH.value}, "
        f"float32, {jax.devices()[0].device_kind}; best of {_REPEATS.value}")
  print(format_table(rows))


if __name__ == "__main__":
  app.run(main)
