"""Checkpoint files: the folder format (checkpoint.py), the native Hugging Face type (native.py), loading guards
(loading.py), the a3mod.json description (sidecar.py), deterministic safetensors (tensors.py), atomic files
(files.py) and fingerprints (fingerprint.py)."""
