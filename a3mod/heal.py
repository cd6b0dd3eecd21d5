"""Healing: a short distillation of a compressed model toward the original's next-token distributions.

    teacher = copy.deepcopy(model)                       # before compressing
    a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib)
    a3mod.heal(model, teacher, calib, steps=100)         # in place; the model keeps its (reduced) structure

Loss: KL(teacher || student) over every position's next-token distribution at temperature T (x T^2), on the
calibration windows (the same data the closed forms were fitted on; no labels). Only the decoder layers' weights
train (all of them: the reduced projections, norms and biases); embeddings and the LM head stay, so tied weights
stay tied and the vocabulary side is the original's. AdamW, linear warm-up over the first tenth of the steps and
cosine decay, gradients clipped at 1. Dropout stays off (the model is kept in eval mode). The result saves and
loads like any a3mod checkpoint (the sidecar records the run under "heal").
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import get_path, spec_for
from .errors import A3ModError, CalibrationError
from .modules.linears import is_quantized
from .validate import integer, number


def _layer_params(model: nn.Module) -> list[nn.Parameter]:
    layers = get_path(model, spec_for(model).layers)
    return [p for p in layers.parameters() if p.is_floating_point()]


def heal(model: nn.Module, teacher: nn.Module, calib: Tensor, steps: int = 100, lr: float = 1e-4,
         batch_size: int = 1, temperature: float = 1.0, weight_decay: float = 0.0, progress: bool = True) -> dict:
    """Distil `model` toward `teacher` on the windows of `calib` (n, T) for `steps` optimiser steps, in place.

    Returns {"steps", "lr", "batch_size", "temperature", "loss_first", "loss_last", "seconds", "tokens"}; the same
    record goes to model.a3mod_info["heal"]. Every argument is checked before any work; a run that fails (a
    non-finite loss, an interrupt) leaves the model's weights as they were."""
    steps = integer("heal", "steps", steps)
    batch_size = integer("heal", "batch_size", batch_size)
    lr = number("heal", "lr", lr, 0.0, 1.0, lo_open=True, hi_open=True)
    temperature = number("heal", "temperature", temperature, 0.01, 100.0,
                         what="the softening of both distributions; the loss is scaled by its square")
    weight_decay = number("heal", "weight_decay", weight_decay, 0.0)
    _check_models(model, teacher, calib)
    params = _layer_params(model)
    saved = [p.detach().clone() for p in params]
    t0 = time.perf_counter()
    try:
        losses = _distil(model, teacher, calib, params, steps, lr, batch_size, temperature, weight_decay, progress)
    except BaseException:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        raise
    record = {"steps": steps, "lr": lr, "batch_size": batch_size, "temperature": temperature,
              "loss_first": losses[0], "loss_last": losses[-1], "seconds": time.perf_counter() - t0,
              "tokens": steps * batch_size * calib.shape[1]}
    info = dict(getattr(model, "a3mod_info", None) or {})
    info["heal"] = record
    model.a3mod_info = info
    return record


def _check_models(model: nn.Module, teacher: nn.Module, calib: Tensor) -> None:
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise CalibrationError(f"heal: calib must be (n_samples, seq_len) token ids, got "
                               f"{getattr(calib, 'shape', type(calib).__name__)}")
    if calib.numel() == 0:
        raise CalibrationError(f"heal: calib holds no tokens (shape {tuple(calib.shape)})")
    if teacher is model:
        raise A3ModError("heal: teacher is the model itself; pass the original (a copy taken before compressing)")
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    tvocab = teacher.get_output_embeddings().weight.shape[0] if hasattr(teacher, "get_output_embeddings") else None
    if vocab is None or vocab != tvocab:
        raise A3ModError(f"heal: model and teacher must be causal LMs with one vocabulary (got {vocab} and {tvocab})")
    lo, hi = int(calib.min()), int(calib.max())
    if lo < 0 or hi >= vocab:
        raise CalibrationError(f"heal: calib holds token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab})")
    if any(is_quantized(m) for m in model.modules()):
        raise A3ModError("heal: the model holds quantized linears; heal after compression, before quantization")


def _distil(model, teacher, calib: Tensor, params: list, steps: int, lr: float, batch_size: int,
            temperature: float, weight_decay: float, progress: bool) -> list[float]:
    """The optimisation loop (AdamW, warm-up + cosine, gradients clipped at 1); returns the loss of every step."""
    trained = {id(p) for p in params}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    device = next(model.parameters()).device
    order, losses = torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(0)), []
    model.eval()
    teacher.eval()
    try:
        for step in tqdm(range(steps), desc="healing", disable=not progress, unit="step"):
            ids = calib[order[(step * batch_size + torch.arange(batch_size)) % calib.shape[0]]].to(device)
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float() / temperature, -1)
            logits = model(input_ids=ids, use_cache=False).logits.float() / temperature
            loss = nn.functional.kl_div(torch.log_softmax(logits, -1).flatten(0, 1), target.flatten(0, 1),
                                        log_target=True, reduction="batchmean") * temperature ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                raise A3ModError(f"heal: the loss became {losses[-1]} at step {step}; the model is left as it was "
                                 f"(try a smaller lr)")
    finally:
        opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return losses
