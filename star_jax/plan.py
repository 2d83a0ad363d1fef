"""Compile a train step ahead of time on a simulated CPU mesh and print what one device would hold.

  star-jax plan --config configs/star.py:paper --stage stage2 --mesh data=2,fsdp=4,tensor=1 --batch 16
  star-jax plan --config configs/star.py:paper --stage stage2 --mesh fsdp=64 --batch 64 --accelerator tpu-v5p

Nothing is allocated: the state and batch are abstract (`jax.eval_shape`) and the step is lowered and
compiled for a mesh of that many simulated CPU devices. Per device it prints the bytes of the trainable
params, the optimizer state, the rest of the state (frozen models, EMA), the batch and XLA's temporaries,
the FLOPs and collective bytes of one step, and a roofline step time and MFU for the accelerator from its
datasheet. Temporaries come from the CPU compiler's buffer assignment, a guide to (not a measurement of)
the GPU/TPU figure.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

from star_jax.constants import FRAME_RATE_HZ, STAGES
from star_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Datasheet figures per chip: dense bf16 FLOP/s, HBM bytes and bytes/s, collective bandwidth."""
  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bytes_per_s: float
  link_bytes_per_s: float  # one direction of a ring within the fast domain (NVLink / ICI axis)
  node_devices: int = 0  # devices per fast domain; collectives spanning more use `network_bytes_per_s`
  network_bytes_per_s: float = 0.0


ACCELERATORS = {
    # H100 SXM: 989 TFLOP/s bf16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 450 GB/s each way within an
    # 8-GPU node, 400 Gb/s InfiniBand (50 GB/s) per GPU between nodes.
    "h100": Accelerator("NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, 450e9, 8, 50e9),
    # TPU v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2.765 TB/s; ICI 4800 Gb/s (600 GB/s) per chip over the 6 links
    # of a 3D torus, of which a ring along one mesh axis uses 2 (both directions of one torus dimension).
    "tpu-v5p": Accelerator("TPU v5p", 459e12, 95e9, 2.765e12, 200e9),
}

_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
             "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the compiled step: the op, bytes of its full (unsharded) operand, group size/span."""
  op: str
  full_bytes: int
  group_size: int
  group_span: int  # consecutive device ids the group covers; > node_devices means it leaves the node


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Per-device figures of one compiled step on `num_devices` devices."""
  mesh: dict[str, int]
  num_devices: int
  group_bytes: dict[str, int]  # e.g. params / optimizer / frozen / batch -> per-device bytes
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float  # per device, as XLA's cost analysis counts them (remat recomputation included)
  hbm_bytes_accessed: float
  collectives: tuple[Collective, ...]

  @property
  def peak_bytes(self) -> int:
    """Arguments + new outputs (donated ones reuse their input) + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Prediction:
  accelerator: Accelerator
  compute_s: float
  memory_s: float
  collective_s: float

  @property
  def step_s(self) -> float:
    """Roofline of compute vs HBM traffic, plus collectives assumed not overlapped."""
    return max(self.compute_s, self.memory_s) + self.collective_s

  def mfu(self, flops: float) -> float:
    return flops / (self.step_s * self.accelerator.peak_flops)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of arrays / ShapeDtypeStructs carrying a sharding."""
  total = 0
  for leaf in _leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _leaves(tree: Any) -> list:
  import jax
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or eval_shape output) placed with `shardings`."""
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_ahead(step: Callable, args: Sequence[Any], out_shardings: Any = None,
                  donate_argnums: Sequence[int] = ()):
  """Lower and compile `step(*args)` for abstract, sharded `args` -> a `jax.stages.Compiled`."""
  import jax
  in_shardings = jax.tree.map(lambda x: x.sharding, tuple(args))
  kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
  jitted = jax.jit(step, in_shardings=in_shardings, donate_argnums=tuple(donate_argnums), **kwargs)
  return jitted.lower(*args).compile()


def analyse(compiled, groups: Mapping[str, Any], mesh) -> StepPlan:
  """Memory, FLOPs and collectives of a compiled step; `groups` names parts of its arguments to report."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return StepPlan(
      mesh=dict(mesh.shape), num_devices=mesh.size,
      group_bytes={name: per_device_bytes(tree) for name, tree in groups.items()},
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      flops=float(cost.get("flops", 0.0)), hbm_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      collectives=tuple(collectives_of(compiled.as_text())))


def collectives_of(hlo_text: str) -> list[Collective]:
  """Every collective op in an HLO module's text (while-loop bodies counted once, as XLA's cost analysis)."""
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    result_bytes = sum(_ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d)
                       for t, dims in _ARRAY.findall(m["type"]))
    size, span = _group(m["rest"])
    if size <= 1:
      continue
    full = result_bytes * size if m["op"] == "reduce-scatter" else result_bytes
    found.append(Collective(m["op"], full, size, span))
  return found


def _group(rest: str) -> tuple[int, int]:
  """(group size, span of consecutive device ids) from an op's replica_groups / source_target_pairs."""
  import numpy as np
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", rest):
    # mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'b'}: groups vary along the named axes
    axes = re.findall(r"'([^']+)'=(\d+)", m[1])
    sizes = [int(n) for _, n in axes]
    ids = _device_ids(m[2], math.prod(sizes)).reshape(sizes)
    used = set(re.findall(r"'([^']+)'", m[3]))
    inner = [i for i, (name, _) in enumerate(axes) if name in used]
    outer = [i for i in range(len(axes)) if i not in inner]
    groups = ids.transpose(outer + inner).reshape(-1, math.prod(sizes[i] for i in inner))
  elif m := re.search(r"replica_groups=(\[\d+,\d+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", rest):  # iota form
    shape = [int(d) for d in re.match(r"\[(\d+),(\d+)\]", m[1]).groups()]
    groups = _device_ids(m[1][m[1].index("<=") + 2:], math.prod(shape)).reshape(shape)
  elif m := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", rest):  # {{0,1},{2,3}}
    groups = np.array([[int(i) for i in g.split(",")] for g in re.findall(r"\{([\d,]+)\}", m[1])])
  elif m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}", rest):
    groups = np.array([[int(i) for i in g.split(",")] for g in re.findall(r"\{(\d+,\d+)\}", m[1])])
  else:
    return 1, 1
  if groups.size == 0:
    return 1, 1
  return int(groups.shape[1]), int((groups.max(1) - groups.min(1)).max()) + 1


def _device_ids(text: str | None, count: int):
  """'[2,4]T(1,0)' (iota, reshaped, transposed), '0,1,2,3' or None (0..count-1) -> a flat id array."""
  import numpy as np
  if not text:
    return np.arange(count)
  if m := re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text):
    dims = [int(d) for d in m[1].split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m[2]:
      ids = ids.transpose([int(p) for p in m[2].split(",")])
    return ids.reshape(-1)
  return np.array([int(i) for i in re.findall(r"\d+", text)])


def predict(plan: StepPlan, accelerator: Accelerator) -> Prediction:
  """Roofline step time on `accelerator` from the plan's per-device FLOPs, HBM bytes and collectives."""
  collective_s = 0.0
  for c in plan.collectives:
    fast = not accelerator.node_devices or c.group_span <= accelerator.node_devices
    bandwidth = accelerator.link_bytes_per_s if fast else accelerator.network_bytes_per_s
    share = (c.group_size - 1) / c.group_size
    moved = {"all-reduce": 2 * share, "collective-permute": 1.0}.get(c.op, share) * c.full_bytes
    collective_s += moved / bandwidth
  return Prediction(accelerator, plan.flops / accelerator.peak_flops,
                    plan.hbm_bytes_accessed / accelerator.hbm_bytes_per_s, collective_s)


def gib(n: float) -> str:
  """Bytes as GiB, or MiB below one GiB."""
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report(plan: StepPlan, prediction: Prediction, batch_size: int) -> str:
  """The human-readable plan: one line per figure."""
  acc = prediction.accelerator
  mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
  lines = [f"mesh {mesh} ({plan.num_devices} devices), global batch {batch_size}; per device:"]
  lines += [f"  {name:<22}{gib(b):>12}" for name, b in plan.group_bytes.items()]
  lines += [
      f"  {'temporaries':<22}{gib(plan.temp_bytes):>12}",
      f"  {'peak (args+out+temp)':<22}{gib(plan.peak_bytes):>12}   of {acc.hbm_bytes / 2**30:.0f} GiB HBM on "
      f"{acc.name}: {'fits' if plan.peak_bytes <= acc.hbm_bytes else 'DOES NOT FIT'}",
      f"  {'FLOPs / step':<22}{plan.flops / 1e12:>10.3f} T",
      f"  {'collectives / step':<22}{gib(sum(c.full_bytes for c in plan.collectives)):>12} in "
      f"{len(plan.collectives)} ops",
      f"{acc.name} roofline: compute {prediction.compute_s * 1e3:.2f} ms, HBM {prediction.memory_s * 1e3:.2f} ms, "
      f"collectives {prediction.collective_s * 1e3:.2f} ms -> step {prediction.step_s * 1e3:.2f} ms, "
      f"MFU {100 * prediction.mfu(plan.flops):.0f}% (an upper bound: perfect kernels)",
  ]
  return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes are 1)."""
  from star_jax.sharding import MESH_AXES
  sizes = {a: 1 for a in MESH_AXES}
  for item in filter(None, text.split(",")):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
      raise UserError(f"--mesh: '{item}' should be AXIS=SIZE with AXIS in {MESH_AXES} and SIZE >= 1")
    sizes[name.strip()] = int(value)
  return sizes




def batch_spec(cfg: Any, keys: Sequence[str], batch_size: int, cached: bool) -> dict[str, tuple]:
  """The step's batch as the data pipeline delivers it: key -> (shape, dtype), for the keys a stage reads.

  `cached`: records carry HuBERT features and VAE latents, so frozen encoders do not run in the step.
  """
  d = cfg.data
  speech = int(round(d.speech_duration_s * d.speech_sample_rate_hz))
  audio = int(round(d.audio_duration_s * cfg.vae.sample_rate_hz))
  frames = int(round(d.speech_duration_s * FRAME_RATE_HZ))
  latents = int(round(d.audio_duration_s * FRAME_RATE_HZ))
  b = batch_size
  spec = {"speech": ((b, speech), "float32"), "speech_mask": ((b, speech), "bool"),
          "audio": ((b, audio), "float32"), "audio_mask": ((b, audio), "bool"),
          "labels": ((b, int(cfg.classifier.num_classes) or 527), "float32")}
  if "text_emb" in keys:
    tokens = int(d.get("text_max_tokens", 16))
    spec.update(text_emb=((b, tokens, int(cfg.tta.text_dim)), "float32"), text_mask=((b, tokens), "bool"))
  if cached:
    spec.update(hubert=((b, frames, int(cfg.hubert.hidden_size)), "float32"), hubert_mask=((b, frames), "bool"),
                latents=((b, latents, int(cfg.vae.latent_channels)), "float32"),
                latents_mask=((b, latents), "bool"))
  return {k: v for k, v in spec.items() if k in keys}


@dataclasses.dataclass(frozen=True)
class StageStep:
  """A stage's train step with abstract, sharded arguments: what `plan_stage` compiles."""
  signature: Any  # star_jax.train.state.StepSignature: the loop's own jitted step and its abstract arguments
  groups: dict[str, Any]  # report name -> part of the arguments
  rules: Any


def stage_step(cfg: Any, stage_name: str, mesh, batch_size: int, cached: bool = False) -> StageStep:
  """`stage_name`'s train step, built by the loop's `train_step_with_signature`, on `mesh`; no allocation."""
  import jax

  from star_jax import sharding
  from star_jax.train import stage as stage_lib, state as state_lib

  stage = stage_lib.build_stage(cfg, stage_name)
  hp = stage.hparams
  rules = sharding.logical_rules(cfg.logical_axis_rules)
  schedule = state_lib.make_schedule(hp, 1000, max(int(hp.get("steps") or 0), 2000))
  tx = state_lib.make_optimizer(hp, schedule)
  ema_decay = float(hp.get("ema_decay", 0.0) or 0.0)
  shapes, shardings = state_lib.state_layout(stage.init, tx, mesh, rules, jax.random.PRNGKey(0), ema_decay > 0)
  signature = state_lib.train_step_with_signature(
      stage.loss, hp, cfg.train.nan_policy, tx, schedule, shapes, shardings,
      batch_spec(cfg, stage.batch_keys, batch_size, cached), mesh)
  state, batch, _ = signature.args
  groups = {"params (trained)": state.params, "optimizer state": state.opt_state,
            "frozen models": state.frozen}
  if state.ema is not None:
    groups["EMA params"] = state.ema
  groups["batch"] = batch
  return StageStep(signature, groups, rules)


def plan_stage(cfg: Any, stage_name: str, mesh, batch_size: int, cached: bool = False) -> StepPlan:
  """Compile `stage_name`'s train step for `mesh` ahead of time, as the train loop does -> its plan."""
  s = stage_step(cfg, stage_name, mesh, batch_size, cached)
  return analyse(s.signature.compile(mesh, s.rules), s.groups, mesh)



def add_arguments(p) -> None:
  p.add_argument("--config", default="configs/star.py:paper", help="config file and variant")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  p.add_argument("--stage", default="stage2", choices=STAGES, help="which train step to plan")
  p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=2,fsdp=4,tensor=1")
  p.add_argument("--batch", type=int, required=True, help="global batch size")
  p.add_argument("--accelerator", default="h100", choices=sorted(ACCELERATORS))
  p.add_argument("--cached-features", action="store_true",
                 help="records carry HuBERT features and VAE latents (frozen encoders do not run)")


def run(args) -> int:
  sizes = parse_mesh(args.mesh)
  num_devices = math.prod(sizes.values())
  import jax
  jax.config.update("jax_platforms", "cpu")
  try:  # before any device query: this process becomes a host with `num_devices` simulated devices
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError as e:
    raise UserError("plan: JAX devices were already initialised; run plan in a fresh process") from e
  from star_jax import config as config_lib, sharding
  cfg = config_lib.load_config(args.config, args.set)
  mesh = sharding.make_mesh(sizes, jax.devices()[:num_devices])
  sharding.check_batch_size(args.batch, mesh)
  plan = plan_stage(cfg, args.stage, mesh, args.batch, args.cached_features)
  print(report(plan, predict(plan, ACCELERATORS[args.accelerator]), args.batch))
  return 0
