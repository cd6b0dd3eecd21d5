"""a3mod's native Hugging Face model type: compressed checkpoints that transformers itself loads and saves.

config.json of a compressed model is the original model's config plus three keys:
    "model_type": "a3mod", "a3mod_base_model_type": "llama",
    "a3mod": {"format": 3, "model_class": "LlamaForCausalLM", "layers": {"0": {"attn": {...}, "mlp": {...}}, ...}}
`a3mod` is the description a3mod.json's sidecar has always held (per-layer q/k and v/o head dims, kept RoPE dims,
MLP widths and kept neurons, narrowed and low-rank linears, experts, latent attention), validated by
`a3mod.io.sidecar.validate` before any module is built. Importing a3mod registers model type "a3mod" with
`AutoConfig` and the `AutoModel*` classes, so `AutoModelForCausalLM.from_pretrained(dir, dtype=..., device_map=...)`
runs transformers' own loading (meta init, dtype, device_map, shards) and `save_pretrained`, `push_to_hub` and
`Trainer.save_model` write the folder back. Without a3mod installed, transformers refuses the folder ("model type
`a3mod` ... not recognized"): never a dense model with random weights.

In memory there is one pair of classes per original class, made on first use and cached:
    A3modLlamaConfig(_NativeConfig, LlamaConfig): the instance says model_type "llama" (the architecture
        transformers' code and a3mod's adapters know); to_dict writes "a3mod".
    A3modLlamaForCausalLM(_NativeModel, LlamaForCausalLM): the original __init__ builds the dense skeleton (on the
        meta device under from_pretrained), then the reduced modules the config describes replace their layers'
        modules before any weight is read. `save_pretrained` refreshes the description from the modules first.
`adopt(model)` turns a model compressed in this process into its native class in place (apply and load call it); its
modules get a native copy of the config, so the caller's config object still builds dense models.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import CheckpointError
from ..validate import nonfinite_weight
from . import sealed, sidecar, tensors
from .description import (
    INFO_EXTRAS, attach_latent_rotary, build_reduced, check_indices, describe_model, rebuild_nonpersistent, slim,
    transformers_class,
)
from .files import SIDECAR
from .guards import NO_CODE, check_files, check_folder, recorded_dtype

MODEL_TYPE = "a3mod"
_AUTO = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
         "AutoModelForTokenClassification", "AutoModelForQuestionAnswering")
_CONFIGS: dict[type, type] = {}      # original config class -> native config class
_MODELS: dict[tuple, type] = {}      # (original model class, native config class) -> native model class
_DESCRIPTION_KEYS = ("format", "a3mod_version", "model_type", "model_class", "passes", "calib_tokens",
                     "orig_layer_params", "layers", "quant", *INFO_EXTRAS)


def _base_config_class(model_type) -> type:
    if not isinstance(model_type, str) or model_type == MODEL_TYPE or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"config.json: a3mod_base_model_type = {model_type!r} is not a model type this "
                              f"transformers knows")
    return CONFIG_MAPPING[model_type]


class A3modConfig(PretrainedConfig):
    """The class registered for model_type "a3mod": `from_dict` returns the native config of the original type
    (`a3mod_base_model_type`), e.g. an A3modLlamaConfig."""
    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        base = _base_config_class(config_dict.get("a3mod_base_model_type"))
        return config_class(base).from_dict(config_dict, **kwargs)


class _NativeConfig:
    """Mixed in before the original config class: serialises as model_type "a3mod" with the original type named."""
    a3mod_base_config: type

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        d = {k: v for k, v in config_dict.items() if k not in ("model_type", "a3mod_base_model_type")}
        return super().from_dict(d, **kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["model_type"] = MODEL_TYPE
        out["a3mod_base_model_type"] = self.a3mod_base_config.model_type
        return out


def _publish(cls: type) -> type:
    """Make a generated class importable by name from this module (pickle, copy, error messages)."""
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    setattr(sys.modules[__name__], cls.__name__, cls)
    return cls


def config_class(base: type) -> type:
    """The native config class of original config class `base` (made and registered with the Auto classes once)."""
    base = getattr(base, "a3mod_base_config", base)
    if base not in _CONFIGS:
        cls = type(f"A3mod{base.__name__}", (_NativeConfig, base),
                   {"model_type": base.model_type, "a3mod_base_config": base, "__module__": __name__})
        _CONFIGS[base] = _publish(cls)
        _register_models(base, cls)
    return _CONFIGS[base]


def _register_models(base_config: type, native_config: type) -> None:
    """Every Auto class whose mapping has a model for `base_config` gets that model's native class."""
    for name in _AUTO:
        auto = getattr(transformers, name)
        try:
            base_model = auto._model_mapping[base_config]
        except KeyError:
            continue
        if isinstance(base_model, (list, tuple)):
            base_model = base_model[0]
        auto.register(native_config, model_class(base_model, native_config), exist_ok=True)


def model_class(base: type, native_config: type | None = None) -> type:
    """The native model class of original model class `base` (LlamaForCausalLM -> A3modLlamaForCausalLM)."""
    base = getattr(base, "a3mod_base", base)
    cfg = native_config or config_class(base.config_class)
    if (base, cfg) not in _MODELS:        # a model class some types share with another config class: one per pair
        name = f"A3mod{base.__name__}" + ("" if cfg.a3mod_base_config is base.config_class
                                           else f"_{cfg.a3mod_base_config.__name__}")
        cls = type(name, (_NativeModel, base), {"config_class": cfg, "a3mod_base": base, "__module__": __name__})
        _MODELS[base, cfg] = _publish(cls)
    return _MODELS[base, cfg]


class _NativeModel:
    """Mixed in before the original model class: the reduced modules the config describes, built at __init__."""
    a3mod_base: type

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        side = getattr(config, "a3mod", None)
        if side:
            build(self, side)

    def save_pretrained(self, save_directory, *args, **kwargs):
        refresh(self)
        if "quant" in self.config.a3mod:      # library-quantized linears: a3mod's own format (see load_quantized)
            if not kwargs.pop("is_main_process", True):     # another rank of a distributed run writes it
                return None
            kwargs.pop("safe_serialization", None)           # always safetensors
            if args or kwargs:
                raise CheckpointError(f"save_pretrained of a quantized a3mod model writes a3mod's own folder and takes "
                                      f"no other options (got {sorted(kwargs) or list(args)}; transformers' "
                                      f"push_to_hub passes some itself); use a3mod.save(model, folder, overwrite=...)")
            if Path(save_directory).exists():
                raise CheckpointError(f"{str(save_directory)!r} exists: save_pretrained of a quantized a3mod model "
                                      f"never replaces a folder; remove it, or use a3mod.save(model, folder, "
                                      f"overwrite=True)")
            return sealed.write(self, save_directory, config_for(self.config, describe_model(self)))
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if config is None or not is_native(config):
            try:
                config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **NO_CODE)
            except (OSError, ValueError):
                config = None
        if config is not None and "quant" in (getattr(config, "a3mod", None) or {}):
            return load_quantized(pretrained_model_name_or_path, kwargs)
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir():
            check_files(folder)
            if (folder / SIDECAR).is_file():      # an a3mod.save folder: its seal and checksums hold here too
                sealed.verify_folder(folder, config)
        asked = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        sizes = {k: v.numel() for k, v in model.state_dict().items()}
        lost = sorted(k for k in info.get("missing_keys", ()) if sizes.get(k, 1))   # empty ones hold nothing
        if lost:                                  # transformers would fill them with random values
            raise CheckpointError(f"{str(pretrained_model_name_or_path)!r} lacks {len(lost)} weights the described "
                                  f"model needs, e.g. {lost[:3]}; a3mod never fills weights with random values")
        model = tensors.realign(model)
        # transformers treats this subclass as custom code, whose initialisation skips modules without parameters of
        # their own: a non-persistent buffer a parent's _init_weights writes (Falcon-H1's mup_vector) would hold
        # uninitialised memory. Rebuild every non-persistent buffer as a3mod.load does.
        rebuild_nonpersistent(model)
        check_indices(model)
        check_finite_weights(model, pretrained_model_name_or_path)
        if folder.is_dir():
            check_stored_kinds(folder, model)
        return (model, info) if asked else model


def check_stored_kinds(folder: Path, model: nn.Module) -> None:
    """CheckpointError when a tensor of the folder's safetensors files is stored as integers (or bool) where the
    model holds floating-point values, or the other way round: transformers casts it silently (a corrupted or edited
    file). Widths may differ (weights kept in float32 beside bf16 ones)."""
    floating = {k: t.is_floating_point() for k, t in model.state_dict().items()}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            plan = tensors.file_plan(f)
        except KeyError as e:                 # a safetensors dtype torch has no name for here (F8_E8M0, ...)
            raise CheckpointError(f"{f.name} stores a tensor in dtype {e}, which a3mod does not read") from None
        for key, dt, _, _ in plan:
            if key in floating and floating[key] != dt.is_floating_point:
                raise CheckpointError(f"{key!r} is stored as {dt} in {f.name}, where the model holds "
                                      f"{'floating-point' if floating[key] else 'integer'} values (a corrupted or "
                                      f"edited weights file)")


def check_finite_weights(model: nn.Module, where) -> None:
    """CheckpointError naming the first loaded weight with NaN or infinite values."""
    name = nonfinite_weight(model)
    if name is not None:
        raise CheckpointError(f"weight {name!r} loaded from {str(where)!r} has NaN or infinite values")


def description(model: nn.Module) -> dict:
    """What config.json's "a3mod" holds for `model`: a3mod.json's description without its file records and index
    lists (io/codecs.py: the slim form)."""
    return slim(describe_model(model))


def build(model: nn.Module, side: dict) -> None:
    """Swap the reduced modules `side` describes into `model` (a dense skeleton of the original class)."""
    if not isinstance(side, dict):
        raise CheckpointError(f"config.json: a3mod must be an object, got {type(side).__name__}")
    extra = sorted(set(side) - set(_DESCRIPTION_KEYS))
    if extra:
        raise CheckpointError(f"config.json: a3mod has unknown keys {extra}")
    if "quant" in side:
        raise CheckpointError("config.json describes a quantized a3mod model: load it with a3mod.load(path), which "
                              "restores the quantized linears")
    try:                          # the sidecar's schema and rebuild; errors name config.json, where this came from
        sidecar.validate(side, slim=True)
        build_reduced(model, side, None, None)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("a3mod.json", "config.json's a3mod description", 1)) from None
    attach_latent_rotary(model)
    model.a3mod_info = {k: side[k] for k in ("passes", "calib_tokens", "orig_layer_params", *INFO_EXTRAS) if k in side}


def config_for(config: PretrainedConfig, side: dict) -> PretrainedConfig:
    """A native copy of `config` (an original or native config) describing `side` (what `description` returns)."""
    out = copy.deepcopy(config)
    out.__class__ = config_class(type(config))
    out.a3mod = slim({k: side[k] for k in _DESCRIPTION_KEYS if k in side})
    return out


def refresh(model: nn.Module) -> None:
    """Write the model's current description into its config (called before every save)."""
    model.config.a3mod = description(model)


def is_native(model_or_config) -> bool:
    return isinstance(model_or_config, (_NativeModel, _NativeConfig))


def adopt(model: nn.Module) -> nn.Module:
    """Turn `model` (a transformers model compressed in place) into its native class in place; its modules and
    weights stay the same objects, every module holding the model's config gets one native copy of it. Other
    modules are returned unchanged."""
    old = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or not isinstance(old, PretrainedConfig):
        return model
    if not is_native(old):       # a native copy: the caller's config object may build other (dense) models
        new = config_for(old, {})
        for m in model.modules():
            if getattr(m, "config", None) is old:
                m.config = new
    model.__class__ = model_class(type(model), type(model.config))
    refresh(model)
    return model


def is_native_folder(path) -> bool:
    """A folder whose config.json says model_type "a3mod" (save_pretrained or a3mod.save)."""
    try:
        return json.loads((Path(path) / "config.json").read_bytes()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_folder(path, device="cpu", dtype=None) -> nn.Module:
    """A native folder without a3mod.json (written by save_pretrained / push_to_hub / Trainer): loaded by
    transformers' from_pretrained of the class config.json's description names; safetensors only, no code run."""

    check_folder(path)
    config = AutoConfig.from_pretrained(path, **NO_CODE)
    base = _base_model_class(config.a3mod.get("model_class"), config)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = model_class(base, type(config)).from_pretrained(path, config=config, use_safetensors=True,
                                                            device_map=torch.device(device), **kw, **NO_CODE)
    model.a3mod_source_dtype = recorded_dtype(path)      # a re-save keeps it
    return model.eval()


def load_quantized(path, kwargs: dict) -> nn.Module:
    """A quantized a3mod model (BnbInt8 / Bnb4bit / HQQ after compression): transformers has no loader for a3mod's
    quantized modules, so from_pretrained reads the folder with `a3mod.load` (checksums verified). `dtype` and a
    single-device `device_map` are honoured; other loading options are refused by name."""

    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    device = kwargs.pop("device_map", None) or "cpu"
    for k in ("config", "trust_remote_code", "use_safetensors", "local_files_only", "revision", "adapter_kwargs",
              "subfolder", "cache_dir", "force_download", "token", "_from_auto", "_from_pipeline", "_commit_hash",
              "code_revision"):                  # hub plumbing transformers passes along; nothing to do locally
        kwargs.pop(k, None)
    if kwargs:
        raise CheckpointError(f"a quantized a3mod checkpoint loads through a3mod.load, which takes dtype and one "
                              f"device; from_pretrained got {sorted(kwargs)}")
    if isinstance(device, dict) or device == "auto":
        raise CheckpointError(f"device_map={device!r}: a quantized a3mod checkpoint loads onto one device")
    if not (Path(path) / SIDECAR).is_file():
        raise CheckpointError(f"{str(path)!r} describes a quantized a3mod model but holds no a3mod.json")
    model = sealed.read(path, device=str(torch.device(device)), dtype=None if dtype == "auto" else dtype)
    return adopt(model)


def _base_model_class(name, config) -> type:
    """The original class the description names, else the base type's causal-LM class."""

    return transformers_class(name) or transformers.AutoModelForCausalLM._model_mapping[config.a3mod_base_config]


def register() -> None:
    """Register model type "a3mod" with AutoConfig (done when a3mod is imported; idempotent)."""
    AutoConfig.register(MODEL_TYPE, A3modConfig, exist_ok=True)
