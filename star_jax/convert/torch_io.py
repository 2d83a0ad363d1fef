"""Reading untrusted PyTorch checkpoints safely: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import os

import numpy as np

from star_jax.errors import UserError


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .safetensors / .pt / .pth / .ckpt / .bin file -> {name: float32 numpy array}.

  Never unpickles arbitrary objects: torch files load with `weights_only=True`. A `state_dict` or
  `model` entry at the top level (Lightning / EzAudio layouts) is unwrapped.
  """
  if not os.path.isfile(path):
    raise UserError(f"checkpoint '{path}' does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
      raise UserError(f"'{path}' is not a readable safetensors file: {e}") from e
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else np.asarray(v) for k, v in tensors.items()}
  import torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - includes UnpicklingError for disallowed globals
    raise UserError(f"'{path}' could not be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); star-jax never unpickles arbitrary "
                    f"objects: re-save it as a state_dict or safetensors") from e
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise UserError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
  return out
