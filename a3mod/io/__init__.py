"""Checkpoint files: `a3mod.save` / `a3mod.load` (checkpoint.py) over the sealed folder format (sealed.py) and the
native Hugging Face type (native.py; its quantized models use the sealed format), loading guards (guards.py,
loading.py), the a3mod.json description (description.py, sidecar.py, schema.py, codecs.py), deterministic
safetensors (tensors.py), atomic files (files.py) and fingerprints (fingerprint.py)."""
