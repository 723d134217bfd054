"""SegFormer (Xie et al., 2021): the Mix Transformer encoder (MiT-B0...B5) and the all-MLP decoder.

Faithful to transformers' `SegformerForSemanticSegmentation`, so that its PyTorch checkpoints
load with the same outputs (`convert_transformers` below; tests/test_segformer.py):

- Encoder: four stages at strides 4, 8, 16, 32. Each starts with an overlapping patch
  embedding (a conv with kernel 7/stride 4, then kernel 3/stride 2, padded by kernel // 2,
  and a LayerNorm), then `depths[i]` blocks of pre-norm efficient self-attention (keys and
  values from the map reduced by a `sr_ratio` x `sr_ratio` strided conv and a LayerNorm) and
  Mix-FFN (linear, 3x3 depth-wise conv, exact GELU, linear), each with a residual connection
  and stochastic depth in training, and ends with a LayerNorm.
- Decoder: each stage's map linearly projected to `decoder_hidden_size`, upsampled
  bilinearly to stride 4, concatenated from the deepest stage to the shallowest, fused by a
  1x1 conv, batch norm and ReLU, dropout, and a 1x1 classifier.
- Output: the stride-4 logits upsampled bilinearly to the input size. Every resize here
  enlarges, where `jax.image.resize`'s "bilinear" is torch's `interpolate(...,
  align_corners=False)` (half-pixel centres, edges clamped); it differs from torch only when
  shrinking (it antialiases).

LayerNorms use epsilon 1e-5 (torch's default, which transformers' modules use whatever the
config's `layer_norm_eps`); batch norm epsilon 1e-5 and momentum 0.1 in torch's convention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seg_jax import init_from
from seg_jax import registry
from seg_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Variant:
  """One MiT size: the architecture of transformers' `nvidia/mit-b*` configs."""
  hidden_sizes: tuple[int, ...]
  depths: tuple[int, ...]
  decoder_hidden_size: int
  num_heads: tuple[int, ...] = (1, 2, 5, 8)
  sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
  mlp_ratio: int = 4


VARIANTS = {
    "b0": Variant((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": Variant((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": Variant((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": Variant((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": Variant((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": Variant((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
PATCH_SIZES = (7, 3, 3, 3)
STRIDES = (4, 2, 2, 2)
INPUT_MULTIPLE = 32  # the product of the strides: every stage's map has an integer size
LAYER_NORM_EPS = 1e-5

# The MiT's initialisation (the authors' code): linear layers truncated normal with std 0.02,
# convolutions He normal over fan-out (kh * kw * out / groups: 9 for a depth-wise 3x3 conv, which
# is its fan-in in flax's reckoning of a [3, 3, 1, C] kernel). The classifier is normal with std
# 0.01, as mmseg's decode heads start it: He over a fan-out of K = 6 classes (weights of std
# 0.58 over 256 batch-normed ReLU inputs) started the logits with a std near 6.5, a saturated
# softmax through which the Dice loss has almost no gradient.
_dense_init = nn.initializers.truncated_normal(0.02)
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_classifier_init = nn.initializers.normal(0.01)


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


def _dense(features, dtype, name):
  return nn.Dense(features, kernel_init=_dense_init, dtype=dtype, name=name)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of [N, H, W, C] to a larger (or equal) size: torch's align_corners=False."""
  if x.shape[1:3] == (height, width):
    return x
  if height % x.shape[1] == 0 and width % x.shape[2] == 0:  # always, inside the model
    return layers.upsample_bilinear(x, (height // x.shape[1], width // x.shape[2]))
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method="bilinear")


class DepthwiseConv3x3(nn.Module):
  """A 3x3 depth-wise convolution (stride 1, zero padding 1) with bias: flax's
  `nn.Conv(C, (3, 3), feature_group_count=C)`, with its parameters, computed as nine shifted
  multiply-adds. XLA:CPU's grouped-convolution gradients are ~50x slower than these fused
  element-wise ops (110 ms vs 2 ms for [8, 16, 16, 128], forward and backward), and
  SegFormer's Mix-FFN has one in every block."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param("kernel", _depthwise_init, (3, 3, 1, channels), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    x, kernel, bias = (t.astype(self.dtype) for t in (x, kernel, bias))
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = bias
    for i in range(3):
      for j in range(3):
        # lax slices, not indexing: with symbolic sizes (export) indexing becomes a dynamic
        # gather, which the TFLite converter cannot take.
        window = jax.lax.slice_in_dim(jax.lax.slice_in_dim(padded, i, i + height, axis=1),
                                      j, j + width, axis=2)
        out = out + window * kernel[i, j, 0]
    return out


class EfficientSelfAttention(nn.Module):
  """Multi-head self-attention whose keys and values come from the map reduced `sr_ratio`-fold
  per side (a strided conv and a LayerNorm), so its cost is (HW)^2 / sr_ratio^2."""
  num_heads: int
  sr_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    n, h, w, c = x.shape
    head_dim = c // self.num_heads
    tokens = x.reshape(n, h * w, c)
    query = _dense(c, self.dtype, "query")(tokens)
    source = tokens
    if self.sr_ratio > 1:
      reduced = layers.Conv(c, (self.sr_ratio,) * 2, strides=self.sr_ratio, padding="VALID",
                            kernel_init=_conv_init, dtype=self.dtype, name="reduction")(x)
      source = reduced.reshape(n, -1, c)
      source = _layer_norm(self.dtype, "reduction_norm")(source)
    key = _dense(c, self.dtype, "key")(source)
    value = _dense(c, self.dtype, "value")(source)
    split = lambda t: t.reshape(n, t.shape[1], self.num_heads, head_dim)
    out = jax.nn.dot_product_attention(split(query), split(key), split(value))
    out = _dense(c, self.dtype, "output")(out.reshape(n, h * w, c))
    return out.reshape(n, h, w, c)


class MixFFN(nn.Module):
  """Linear -> 3x3 depth-wise conv -> GELU -> linear: the conv gives the positional cue."""
  hidden_features: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    y = _dense(self.hidden_features, self.dtype, "fc1")(x)
    y = DepthwiseConv3x3(dtype=self.dtype, name="dwconv")(y)
    y = nn.gelu(y, approximate=False)  # transformers' "gelu" is the exact, erf form
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = _dense(c, self.dtype, "fc2")(y)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: each example's residual branch is zeroed with probability `rate` and
  the kept ones scaled by 1 / (1 - rate)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class MixTransformerBlock(nn.Module):
  """Pre-norm block: x + attention(norm1(x)), then x + mix_ffn(norm2(x))."""
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def residual(branch):
      if train and self.drop_path_rate > 0:
        return drop_path(branch, self.drop_path_rate, self.make_rng("dropout"))
      return branch

    y = _layer_norm(self.dtype, "norm1")(x)
    x = x + residual(EfficientSelfAttention(self.num_heads, self.sr_ratio, dtype=self.dtype,
                                            name="attention")(y))
    y = _layer_norm(self.dtype, "norm2")(x)
    return x + residual(MixFFN(x.shape[-1] * self.mlp_ratio, dtype=self.dtype,
                               name="mlp")(y, train=train))


class MixTransformer(nn.Module):
  """The MiT encoder: the maps of its four stages, [N, H/s, W/s, hidden_sizes[i]] for
  s = 4, 8, 16, 32."""
  hidden_sizes: Sequence[int]
  depths: Sequence[int]
  num_heads: Sequence[int]
  sr_ratios: Sequence[int]
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    total = sum(self.depths)
    # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    maps, block_index = [], 0
    for i, (features, depth) in enumerate(zip(self.hidden_sizes, self.depths)):
      pad = PATCH_SIZES[i] // 2
      x = layers.Conv(features, (PATCH_SIZES[i],) * 2, strides=STRIDES[i],
                      padding=((pad, pad), (pad, pad)), kernel_init=_conv_init,
                      dtype=self.dtype, name=f"stage{i}_patch_embed")(x)
      x = _layer_norm(self.dtype, f"stage{i}_patch_norm")(x)
      for j in range(depth):
        x = MixTransformerBlock(self.num_heads[i], self.sr_ratios[i], self.mlp_ratio,
                                rates[block_index], dtype=self.dtype,
                                name=f"stage{i}_block{j}")(x, train=train)
        block_index += 1
      x = _layer_norm(self.dtype, f"stage{i}_norm")(x)
      maps.append(x)
    return maps


class AllMLPDecoder(nn.Module):
  """SegFormer's decode head: stride-4 logits [N, H/4, W/4, num_logits] from the four maps."""
  num_logits: int
  hidden_size: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], *, train: bool) -> jax.Array:
    height, width = maps[0].shape[1:3]
    projected = [resize_bilinear(_dense(self.hidden_size, self.dtype, f"linear{i}")(m),
                                 height, width) for i, m in enumerate(maps)]
    # Deepest stage first: the order of the fuse conv's input channels in the checkpoints.
    y = jnp.concatenate(projected[::-1], axis=-1)
    y = layers.Conv(self.hidden_size, (1, 1), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="fuse")(y)
    y = layers.make_norm("batch", train=train, dtype=self.dtype, relu=True)(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return layers.Conv(self.num_logits, (1, 1), kernel_init=_classifier_init, dtype=self.dtype,
                       name="classifier")(y)


class SegFormer(nn.Module):
  """SegFormer returning float32 logits [N, H, W, num_logits]; H and W multiples of 32.

  `variant` (b0...b5) gives the architecture; `hidden_sizes`, `depths`, `num_heads`,
  `sr_ratios` and `decoder_hidden_size`, when set (non-empty, non-zero), replace the
  variant's (a smaller model, or a checkpoint of another shape).
  """
  num_logits: int = 1
  variant: str = "b0"                 # b0 | b1 | b2 | b3 | b4 | b5 (MiT size, as nvidia/mit-b*)
  hidden_sizes: Sequence[int] = ()    # per-stage channels; () = the variant's
  depths: Sequence[int] = ()          # per-stage blocks; () = the variant's
  num_heads: Sequence[int] = ()       # per-stage attention heads; () = the variant's
  sr_ratios: Sequence[int] = ()       # per-stage key/value reduction; () = the variant's
  decoder_hidden_size: int = 0        # the decoder's channels; 0 = the variant's
  drop_path_rate: float = 0.1         # stochastic depth of the last block (training only)
  dropout: float = 0.1                # before the classifier (training only)
  dtype: Any = jnp.float32

  def architecture(self) -> Variant:
    return architecture(self)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.shape[1] % INPUT_MULTIPLE or x.shape[2] % INPUT_MULTIPLE:
      raise ValueError(f"SegFormer needs H and W divisible by {INPUT_MULTIPLE}, got {x.shape[1:3]}")
    arch = self.architecture()
    maps = MixTransformer(arch.hidden_sizes, arch.depths, arch.num_heads, arch.sr_ratios,
                          arch.mlp_ratio, self.drop_path_rate, dtype=self.dtype,
                          name="encoder")(x.astype(self.dtype), train=train)
    logits = AllMLPDecoder(self.num_logits, arch.decoder_hidden_size, self.dropout,
                           dtype=self.dtype, name="decoder")(maps, train=train)
    return resize_bilinear(logits.astype(jnp.float32), *x.shape[1:3])


def architecture(model) -> Variant:
  """The architecture of a SegFormer module or `config.model`: its variant's, with the fields
  that are set replacing the variant's."""
  base = VARIANTS[model.variant]
  tuple_or = lambda value, default: tuple(value) if len(value) else default
  return Variant(
      hidden_sizes=tuple_or(model.hidden_sizes, base.hidden_sizes),
      depths=tuple_or(model.depths, base.depths),
      decoder_hidden_size=model.decoder_hidden_size or base.decoder_hidden_size,
      num_heads=tuple_or(model.num_heads, base.num_heads),
      sr_ratios=tuple_or(model.sr_ratios, base.sr_ratios),
      mlp_ratio=base.mlp_ratio)


def _check(config) -> None:
  m = config.model
  registry.check_choice("model.variant", m.variant, tuple(VARIANTS))
  for key in ("hidden_sizes", "depths", "num_heads", "sr_ratios"):
    value = m[key]
    if (not isinstance(value, (tuple, list)) or len(value) not in (0, 4)
        or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value)):
      registry.fail(f"model.{key}", value, "must be () (the variant's) or 4 integers >= 1")
  registry.check_int("model.decoder_hidden_size", m.decoder_hidden_size, minimum=0)
  arch = architecture(m)
  for stage, (features, heads) in enumerate(zip(arch.hidden_sizes, arch.num_heads)):
    if features % heads:
      registry.fail("model.num_heads", m.num_heads,
                    f"stage {stage}: {heads} heads do not divide {features} channels")
  registry.check_fraction("model.drop_path_rate", m.drop_path_rate, closed=False)
  registry.check_fraction("model.dropout", m.dropout, closed=False)


# --- transformers' PyTorch checkpoints -------------------------------------------------------
# Key layout of the Hugging Face hub's SegFormer checkpoints (nvidia/mit-b*: an encoder with
# an ImageNet classifier; nvidia/segformer-b*-finetuned-*: with the decode head). transformers 5
# renames these when it loads them (its conversion_mapping.py); `_HUB_NAMES` maps its new names
# back, so a checkpoint saved in either layout converts.
_HUB_NAMES = (  # (transformers 5 name fragment, hub name fragment), applied in order
    ("attention.q_proj", "attention.self.query"),
    ("attention.k_proj", "attention.self.key"),
    ("attention.v_proj", "attention.self.value"),
    ("attention.sequence_reduction.sequence_reduction", "attention.self.sr"),
    ("attention.sequence_reduction.layer_norm", "attention.self.layer_norm"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "mlp.dense1"),
    ("mlp.fc2", "mlp.dense2"),
    ("layernorm_before", "layer_norm_1"),
    ("layernorm_after", "layer_norm_2"),
    ("decode_head.linear_projections", "decode_head.linear_c"),
)


def _hub_name(key: str) -> str:
  """A transformers 5 key in the hub's layout, without the `segformer.` prefix."""
  key = key.removeprefix("segformer.")
  parts = key.split(".")
  if parts[0] == "stages":  # stages.{i}.patch_embeddings / blocks.{j} / layer_norm
    stage, rest = parts[1], parts[2:]
    if rest[0] == "blocks":
      rest = ["block", stage] + rest[1:]
    else:
      rest = [rest[0], stage] + rest[1:]
    key = ".".join(["encoder"] + rest)
  for new, old in _HUB_NAMES:
    key = key.replace(new, old)
  return key


def recognise(tensors: Mapping[str, Any]) -> bool:
  """Whether `tensors` (name -> array) is a transformers SegFormer checkpoint (either layout,
  with or without the `segformer.` prefix of the task models)."""
  names = {_hub_name(k) for k in tensors}
  return "encoder.patch_embeddings.0.proj.weight" in names


def _linear(w):   # torch Linear [out, in] -> flax Dense [in, out]
  return np.asarray(w).T


def _conv(w):     # torch Conv2d [out, in/groups, kh, kw] -> flax [kh, kw, in/groups, out]
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def _ours(hub: str) -> tuple[str, tuple[str, ...], Any] | None:
  """(collection, path, transform) of a hub key in our module, or None for keys we do not use
  (the ImageNet classifier of mit-b*, batch norm's step counter)."""
  p = hub.split(".")
  if p[0] == "encoder":
    kind = p[1]
    if kind == "patch_embeddings":  # patch_embeddings.{i}.proj|layer_norm.weight|bias
      i, layer, leaf = p[2], p[3], p[4]
      if layer == "proj":
        return "params", ("encoder", f"stage{i}_patch_embed",
                          "kernel" if leaf == "weight" else "bias"), _conv if leaf == "weight" else None
      return "params", ("encoder", f"stage{i}_patch_norm", _ln_leaf(leaf)), None
    if kind == "layer_norm":  # layer_norm.{i}.weight|bias
      return "params", ("encoder", f"stage{p[2]}_norm", _ln_leaf(p[3])), None
    if kind == "block":  # block.{i}.{j}.<sub>
      block = ("encoder", f"stage{p[2]}_block{p[3]}")
      sub, leaf = ".".join(p[4:-1]), p[-1]
      norms = {"layer_norm_1": ("norm1",), "layer_norm_2": ("norm2",),
               "attention.self.layer_norm": ("attention", "reduction_norm")}
      if sub in norms:
        return "params", block + norms[sub] + (_ln_leaf(leaf),), None
      dense = {"attention.self.query": ("attention", "query"),
               "attention.self.key": ("attention", "key"),
               "attention.self.value": ("attention", "value"),
               "attention.output.dense": ("attention", "output"),
               "mlp.dense1": ("mlp", "fc1"), "mlp.dense2": ("mlp", "fc2")}
      if sub in dense:
        return "params", block + dense[sub] + (_dense_leaf(leaf),), _linear if leaf == "weight" else None
      convs = {"attention.self.sr": ("attention", "reduction"), "mlp.dwconv.dwconv": ("mlp", "dwconv")}
      if sub in convs:
        return "params", block + convs[sub] + (_dense_leaf(leaf),), _conv if leaf == "weight" else None
    return None
  if p[0] == "decode_head":
    if p[1] == "linear_c":  # linear_c.{i}.proj.weight|bias
      return "params", ("decoder", f"linear{p[2]}", _dense_leaf(p[4])), _linear if p[4] == "weight" else None
    if p[1] == "linear_fuse":
      return "params", ("decoder", "fuse", "kernel"), _conv
    if p[1] == "classifier":
      return "params", ("decoder", "classifier", _dense_leaf(p[2])), _conv if p[2] == "weight" else None
    if p[1] == "batch_norm":
      stats = {"running_mean": "mean", "running_var": "var"}
      if p[2] in stats:
        return "batch_stats", ("decoder", "BatchNorm_0", stats[p[2]]), None
      if p[2] in ("weight", "bias"):
        return "params", ("decoder", "BatchNorm_0", _ln_leaf(p[2])), None
    return None
  return None


def _ln_leaf(leaf: str) -> str:  # torch norm weight/bias -> flax scale/bias
  return {"weight": "scale", "bias": "bias"}[leaf]


def _dense_leaf(leaf: str) -> str:
  return {"weight": "kernel", "bias": "bias"}[leaf]


def convert_transformers(tensors: Mapping[str, Any], hf_config: Mapping[str, Any] | None = None
                         ) -> dict[str, dict]:
  """transformers' SegFormer state dict (name -> array) as our variables:
  {"params": {...}, "batch_stats": {...}} (nested dicts of numpy arrays), holding what the
  checkpoint has: a mit-b* encoder gives only the encoder (its ImageNet classifier is left
  out), a segformer-b*-finetuned-* model the decoder too. `hf_config` (its config.json) is
  checked against the weights: a ValueError lists every mismatch.
  """
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, value in tensors.items():
    target = _ours(_hub_name(key))
    if target is None:
      continue
    collection, path, transform = target
    node = out[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = (transform or np.asarray)(value).astype(np.float32)
  if hf_config is not None:
    problems = [f"config.json {k}={hf_config[k]!r} but the weights say {list(v)!r}"
                for k, v in _weights_architecture(out).items()
                if k in hf_config and list(hf_config[k]) != list(v)]
    if problems:
      raise ValueError("SegFormer checkpoint: " + "; ".join(problems))
  return {k: v for k, v in out.items() if v}


def _weights_architecture(variables) -> dict[str, tuple[int, ...]]:
  encoder = variables["params"].get("encoder", {})
  stages = sorted({int(k.split("_")[0][5:]) for k in encoder})
  return {
      "hidden_sizes": tuple(encoder[f"stage{i}_norm"]["scale"].shape[0] for i in stages),
      "depths": tuple(sum(1 for k in encoder if k.startswith(f"stage{i}_block")) for i in stages),
  }


def model_config_from_transformers(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """Our `config.model` keys (`variant`, and the architecture keys where the checkpoint is not
  a standard variant) for a transformers SegformerConfig (its config.json as a dict)."""
  arch = Variant(tuple(hf_config["hidden_sizes"]), tuple(hf_config["depths"]),
                 int(hf_config.get("decoder_hidden_size", 256)),
                 tuple(hf_config["num_attention_heads"]), tuple(hf_config["sr_ratios"]),
                 int(hf_config.get("mlp_ratios", [4])[0]))
  if (tuple(hf_config.get("patch_sizes", PATCH_SIZES)) != PATCH_SIZES
      or tuple(hf_config.get("strides", STRIDES)) != STRIDES
      or len(set(hf_config.get("mlp_ratios", [4]))) != 1 or arch.mlp_ratio != 4):
    raise ValueError("SegFormer checkpoint: patch sizes, strides or MLP ratios differ from the "
                     f"MiT's ({PATCH_SIZES}, {STRIDES}, 4); this model cannot take it")
  for name, variant in VARIANTS.items():
    if variant == arch:
      return {"variant": name}
  return {"variant": "b0", "hidden_sizes": arch.hidden_sizes, "depths": arch.depths,
          "num_heads": arch.num_heads, "sr_ratios": arch.sr_ratios,
          "decoder_hidden_size": arch.decoder_hidden_size}


ENTRY = registry.register_model(registry.ModelEntry(
    name="segformer", module=SegFormer,
    defaults=registry.field_defaults(SegFormer, exclude=("num_logits", "dtype")),
    input_multiple=lambda m: INPUT_MULTIPLE,
    input_multiple_reason=lambda m: "the input multiple of segformer (strides 4, 2, 2, 2)",
    check=_check,
    backbone=lambda m: "encoder",  # what nvidia/mit-b* checkpoints hold (optimizer.backbone_*)
    description="SegFormer: Mix Transformer encoder (MiT-B0...B5) and all-MLP decoder"))

# model.init_from=DIR of a transformers checkpoint (config.json + model.safetensors).
init_from.register_layout("transformers_segformer", recognise, convert_transformers)
