"""Pretraining performance of ACE on one device, every number measured in the same run.

    python -m benchmarks.bench_pretraining --presets ace-vit-tiny --device cpu --quick
    python -m benchmarks.bench_pretraining --presets ace-vit-tiny ace-vit-b ace-swin-b --device cuda \
        --dtype bf16 --output_json bench_pretraining.json --output_md docs/benchmarks.md

(run from the repository root). For each preset, on synthetic inputs of the preset's shapes:

1. one full pretraining step, the pretraining loop's own (`training_step`: the preset's schedules, forward on
   both views, backward, gradient clipping, AdamW with the project's parameter groups; then the teacher EMA),
   half-way through the preset's recipe, against its ideal: the bare student encoder's forward and
   backward on the [large; small] batch plus the teacher encoder's no-grad forward. Their ratio is what ACE's
   heads, losses, optimizer and EMA cost on top of the encoders;
2. the step's FLOPs (torch's FlopCounterMode) over its time, and over a matmul peak measured here (MFU);
3. the correspondence targets as a fraction of the step;
4. the peak device memory of a step with and without gradient checkpointing (CUDA only);
5. view generation on synthetic 16-bit radiographs (file decoding aside), both ways: all on a data-loader
   worker (one CPU thread), or the worker's half there and the batched rest on the device; and how many
   workers it takes to feed one device each way;
6. inference: AceModel against transformers' ViTModel (SwinModel for Swin) and timm's model of the same
   shape, and AceModel with SDPA against eager attention;
7. with `--compile`: the full step with the model compiled by `torch.compile` (what `accelerate launch
   --dynamo_backend inductor` does to the pretraining model) against the same step in eager mode, and the
   compilation time.

Timings are medians of interleaved rounds after a warm-up (`median_seconds` from bench_correspondence,
which synchronizes CUDA around every call). `--dtype bf16` is autocast over float32 weights, as Accelerate's
mixed precision does. A part of a preset (training, views, inference) that fails, out of memory above all,
is recorded in the report and the rest still runs; the exit status is 1 only for failures that are not memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel, SwinModel, ViTConfig, ViTModel

from ace_hf import AceConfig, AceForPreTraining, AceImageProcessor, AceModel
from ace_hf.correspondence_ace import correspondence_targets, sample_view_origins
from ace_hf.optimization import AceSchedules, make_optimizer
from ace_hf.pretraining.data import ImageBatchCollator, ViewPairCollator, cut_batch_views
from ace_hf.pretraining.loop import training_step
from ace_hf.pretraining.recipe import PretrainingRecipe
from benchmarks.bench_correspondence import median_seconds

try:
    import timm
except ImportError:  # timm is a dev extra: its columns then read n/a
    timm = None

# View pairs per step on CUDA: ACE-B sizes that fit a 139 GB H200 with room to spare.
CUDA_BATCH_SIZES = {"ace-vit-tiny": 64, "ace-vit-b": 32, "ace-swin-b": 16}
# The schedules' resolution (a benchmark has no data set to take it from): any will do, the schedules depend
# on the fraction of the run done, and the step's time on none of them but the last-layer freeze.
STEPS_PER_EPOCH = 100
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["ace-vit-tiny"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--dtype", choices=["float32", "bf16"], default="float32", help="bf16: autocast, float32 weights"
    )
    parser.add_argument(
        "--batch_size", type=int, default=0, help="view pairs per step (0: by preset and device)"
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed rounds (0: 10 on CUDA, 5 on CPU, 2 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and repeats: checks it runs (CI)")
    parser.add_argument(
        "--compile", action="store_true", help="also time the step under torch.compile (inductor; minutes)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default; 1 is steadier on a machine shared with other jobs)",
    )
    parser.add_argument("--output_json", type=Path)
    parser.add_argument("--output_md", type=Path, help="also write the Markdown table here")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Settings:
    """What every measurement shares: device, precision, repeats and sizes."""

    device: torch.device
    bf16: bool
    quick: bool
    repeats: int
    warmup: int  # untimed calls before median_seconds' own warm-up round (CUDA: allocator, kernel choice)
    matmul_size: int
    batch_size: int  # 0: by preset
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward passes only, as Accelerate wraps `model.forward`."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch_for(self, preset: str) -> int:
        if self.batch_size:
            return self.batch_size
        if self.device.type == "cuda":
            return 2 if self.quick else CUDA_BATCH_SIZES.get(preset, 16)
        return 2 if self.quick or preset != "ace-vit-tiny" else 16


def resolve_settings(args: argparse.Namespace) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (2 if args.quick else 10 if cuda else 5)
    return Settings(
        device=device,
        bf16=args.dtype == "bf16",
        quick=args.quick,
        repeats=repeats,
        warmup=0 if args.quick or not cuda else 3,
        matmul_size=(1024 if args.quick else 8192) if cuda else (1024 if args.quick else 2048),
        batch_size=args.batch_size,
        compile=args.compile,
    )


def timed(functions: dict[str, Callable[[], object]], settings: Settings) -> dict[str, float]:
    """Median seconds of each function, interleaved, after `settings.warmup` extra untimed calls of each."""
    for _ in range(settings.warmup):
        for function in functions.values():
            function()
    return median_seconds(functions, settings.repeats, settings.device)


def describe_machine(settings: Settings) -> dict[str, Any]:
    """CPU, GPU and library versions: what the numbers mean depends on all of them."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    cuda = settings.device.type == "cuda"
    return {
        "cpu": cpu,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__ if timm else None,
        "device": settings.device.type,
        "gpu": torch.cuda.get_device_name(settings.device) if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(settings.device).total_memory / GIB
        if cuda
        else None,
        "cuda": torch.version.cuda if cuda else None,
        "dtype": "bf16 autocast, float32 weights" if settings.bf16 else "float32",
    }


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def matmul_peak(settings: Settings) -> dict[str, float]:
    """FLOP/s of a large square matmul in the compute dtype: the ceiling the MFU is measured against."""
    size, device = settings.matmul_size, settings.device
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty_like(a)
    calls = 10 if device.type == "cuda" else 1  # back to back, so launch and sync overheads vanish

    def matmuls() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=out)

    seconds = timed({"matmul": matmuls}, settings)["matmul"] / calls
    return {"size": size, "dtype": str(dtype), "seconds": seconds, "flops_per_s": 2 * size**3 / seconds}


def synthetic_batch(config: AceConfig, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random normalized views and valid view origins, shaped as the collator delivers them."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    origins = sample_view_origins(
        batch_size, config.grid_size, config.view_tokens, config.min_overlap, generator
    )
    return {
        "pixel_values_large": torch.randn(shape, generator=generator).to(device),
        "pixel_values_small": torch.randn(shape, generator=generator).to(device),
        "view_origins": origins.to(device),
    }


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch every transformers model inside `model` (student, teacher, their Swin) to `implementation`.

    A model that cannot switch (an older transformers' Swin without SDPA) keeps its own and says so; the
    report shows the implementation each model ran with.
    """
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != implementation:
            try:
                module.set_attn_implementation(implementation)
            except (ValueError, ImportError, NotImplementedError) as error:
                warnings.warn(f"{type(module).__name__} keeps its attention: {error}", stacklevel=2)


def attention_of(model: nn.Module) -> str:
    """The attention implementations a model runs with (several when its submodels differ)."""
    found = {m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}
    return "+".join(sorted(found)) or "n/a"


def count_flops(model: nn.Module, forward_backward: Callable[[], object]) -> int:
    """FLOPs of one forward + backward, counted with eager attention (FlopCounterMode has no formula for
    the CPU SDPA kernels; eager attention does the same matmuls), gradients dropped afterwards."""
    original = model.config._attn_implementation
    set_attention(model, "eager")
    try:
        with FlopCounterMode(display=False) as counter:
            forward_backward()
    finally:
        set_attention(model, original)
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """Most bytes allocated on the CUDA device during one call of `step`."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@dataclass(frozen=True)
class RecipeAtStep:
    """What the pretraining loop reads from a preset's recipe at the one step the benchmark times."""

    schedules: AceSchedules
    step: int
    max_grad_norm: float


def steady_state(preset: str, config: AceConfig, global_batch: int) -> RecipeAtStep:
    """The preset's recipe, resolved as the pretraining loop resolves it, half-way through its run: past the
    warm-ups and the last-layer freeze (inside which AdamW skips the last layer, a slightly cheaper step), in
    the steady state where a run spends most of its steps."""
    recipe = PretrainingRecipe.resolve(preset, config)
    total_steps = recipe.optimization.num_train_epochs * STEPS_PER_EPOCH
    schedules = recipe.schedules(total_steps, STEPS_PER_EPOCH, global_batch)
    return RecipeAtStep(schedules, total_steps // 2, recipe.optimization.max_grad_norm)


class AutocastForward(nn.Module):
    """`module` with only its forward under the benchmark's autocast, as Accelerate wraps `model.forward`; its
    parameters are the module's, so `training_step` clips the model's gradients through it."""

    def __init__(self, module: nn.Module, settings: Settings) -> None:
        super().__init__()
        self.module = module
        self.settings = settings

    def forward(self, **inputs: Any) -> Any:
        with self.settings.autocast():
            return self.module(**inputs)


def pretraining_step(
    model: AceForPreTraining,
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    settings: Settings,
    at: RecipeAtStep,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward and backward, full step) through `forward`: the model itself or its compiled wrapper. The full
    step is what the pretraining loop does per optimizer step: `training_step`, then the teacher EMA with the
    scheduled momentum (minus logging and the NaN check)."""
    autocast_forward = AutocastForward(forward, settings)
    last_layer = list(model.student.global_head.last_layer.parameters())

    def forward_backward() -> None:
        with settings.autocast():
            loss = forward(**batch).loss
        loss.backward()

    def full_step() -> None:
        training_step(
            autocast_forward,
            optimizer,
            at.schedules,
            at.step,
            batch,
            backward=lambda loss: loss.backward(),
            clip_grad_norm=torch.nn.utils.clip_grad_norm_,
            max_grad_norm=at.max_grad_norm,
            last_layer=last_layer,
        )
        model.update_teacher(at.schedules.teacher_momentum_at(at.step))

    return forward_backward, full_step


def benchmark_training(
    preset: str, config: AceConfig, batch_size: int, settings: Settings, peak_flops_per_s: float
) -> dict[str, Any]:
    """Full step vs encoder-only ideal, FLOPs and MFU, correspondence targets, memory with and without
    gradient checkpointing: all on one model, so the numbers compare like with like."""
    device = settings.device
    with device:  # parameters are created (and initialized) on the device: fast for ACE-B on a GPU
        model = AceForPreTraining(config).train()
    at = steady_state(preset, config, batch_size)
    optimizer = make_optimizer(model, at.schedules.learning_rate_at(at.step), device)
    batch = synthetic_batch(config, batch_size, device)
    both_views = torch.cat([batch["pixel_values_large"], batch["pixel_values_small"]])
    student, teacher = model.student.ace, model.teacher.ace

    forward_backward, full_step = pretraining_step(model, model, optimizer, batch, settings, at)

    def encoders_forward_backward() -> None:
        with settings.autocast():
            embeddings = student(both_views).patch_embeddings
            with torch.no_grad():
                teacher(both_views)
        embeddings.float().mean().backward()

    def ideal_step() -> None:
        encoders_forward_backward()
        student.zero_grad(set_to_none=True)

    def targets() -> None:
        correspondence_targets(batch["view_origins"], config.view_tokens)

    seconds = timed({"full": full_step, "ideal": ideal_step, "targets": targets}, settings)

    memory: dict[str, Any] = {"static_gib": None, "step_peak_gib": None, "checkpointing_step_peak_gib": None}
    if device.type == "cuda":
        memory["static_gib"] = torch.cuda.memory_allocated(device) / GIB  # weights, EMA teacher, AdamW states
        memory["step_peak_gib"] = peak_memory(full_step, device) / GIB
    with warnings.catch_warnings():  # newer transformers rename it; the pretraining script uses this name
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
        try:
            memory["checkpointing_step_s"] = timed({"checkpointing": full_step}, settings)["checkpointing"]
            if device.type == "cuda":
                memory["checkpointing_step_peak_gib"] = peak_memory(full_step, device) / GIB
        finally:
            model.gradient_checkpointing_disable()
    memory["checkpointing_over_full"] = memory["checkpointing_step_s"] / seconds["full"]

    step_flops = count_flops(model, forward_backward)
    ideal_flops = count_flops(model, encoders_forward_backward)
    achieved = step_flops / seconds["full"]
    return {
        "parameters": {
            "encoder": sum(p.numel() for p in student.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        "step": {
            "full_s": seconds["full"],
            "ideal_s": seconds["ideal"],
            "full_over_ideal": seconds["full"] / seconds["ideal"],
            "images_per_s": batch_size / seconds["full"],
        },
        "flops": {
            "step": step_flops,
            "ideal_step": ideal_flops,
            "achieved_flops_per_s": achieved,
            "mfu": achieved / peak_flops_per_s,
            "ideal_mfu": ideal_flops / seconds["ideal"] / peak_flops_per_s,
        },
        "correspondence": {
            "targets_s": seconds["targets"],
            "fraction_of_step": seconds["targets"] / seconds["full"],
        },
        "memory": memory,
    }


def benchmark_compile(preset: str, config: AceConfig, batch_size: int, settings: Settings) -> dict[str, Any]:
    """The full step with the pretraining model under torch.compile (inductor) against the same step in eager
    mode, interleaved on one model; the compilation is the first compiled call, timed apart."""
    device = settings.device
    with device:
        model = AceForPreTraining(config).train()
    at = steady_state(preset, config, batch_size)
    optimizer = make_optimizer(model, at.schedules.learning_rate_at(at.step), device)
    batch = synthetic_batch(config, batch_size, device)
    _, eager_step = pretraining_step(model, model, optimizer, batch, settings, at)
    _, compiled_step = pretraining_step(model, torch.compile(model), optimizer, batch, settings, at)

    start = time.perf_counter()
    compiled_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start
    seconds = timed({"eager": eager_step, "compiled": compiled_step}, settings)
    return {
        "compile_s": compile_s,
        "eager_step_s": seconds["eager"],
        "compiled_step_s": seconds["compiled"],
        "compiled_over_eager": seconds["compiled"] / seconds["eager"],
    }


def synthetic_radiographs(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth 12-bit-in-uint16 images with a little grain: what a detector writes, at a detector's size."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 12, 12, generator=generator)
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    images = smooth + 0.02 * torch.randn(count, 1, side, side, generator=generator)
    low, high = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
    scaled = ((images - low) / (high - low) * 4095).round()
    return [image[0].numpy().astype(np.uint16) for image in scaled]


def as_examples(images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Decoded arrays as dataset rows, so the collators run as in a DataLoader worker (file decoding aside)."""
    return [{"index": index, "image": image} for index, image in enumerate(images)]


def source_side(config: AceConfig) -> int:
    """Side of the synthetic source images: 2048 (a chest detector) when the jittered image is 1024 px or
    more (the 448 px presets), else the jittered side itself (the tiny preset's 320 px DRRs)."""
    jittered = config.grid_size * config.token_stride
    return 2048 if jittered >= 1024 else jittered


def benchmark_views(
    config: AceConfig, settings: Settings, step_images_per_s: float | None, cache: dict[str, dict]
) -> dict[str, Any]:
    """View generation, both ways, side by side: all on a CPU worker (ViewPairCollator), or split into the
    worker's half (ImageBatchCollator: window, draw the parameters, shrink the jitter crops) and the device's
    (cut_batch_views on the benchmark device). Workers run on ONE CPU thread each; the device half times a batch.
    Presets with the same processor settings share one measurement."""
    processor = AceImageProcessor.from_ace_config(config)
    side = source_side(config)
    key = f"{processor.to_json_string()}|{side}|{settings.device}"
    if key not in cache:
        examples = as_examples(synthetic_radiographs(2 if settings.quick else 4, side))
        on_cpu, on_device = ViewPairCollator(processor), ImageBatchCollator(processor)
        worker_batch = on_device(examples)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # Seconds per round on a CPU: a few rounds give a steady median.
            cpu = replace(settings, device=torch.device("cpu"), warmup=0, repeats=min(settings.repeats, 3))
            seconds = timed(
                {"cpu_path": lambda: on_cpu(examples), "worker_half": lambda: on_device(examples)}, cpu
            )
        finally:
            torch.set_num_threads(threads)
        with settings.autocast():
            seconds |= timed(
                {"device_half": lambda: cut_batch_views(processor, worker_batch, settings.device)}, settings
            )
        cache[key] = {
            "source_side": side,
            "images": len(examples),
            **{f"{part}_images_per_s": len(examples) / seconds[part] for part in seconds},
        }
    views = dict(cache[key])
    known = step_images_per_s is not None  # unknown when the training part failed
    for part in ("cpu_path", "worker_half"):
        views[f"workers_needed_{part}"] = step_images_per_s / views[f"{part}_images_per_s"] if known else None
    views["device_half_fraction_of_step"] = (
        step_images_per_s / views["device_half_images_per_s"] if known else None
    )
    return views


def vit_reference(config: AceConfig) -> nn.Module:
    """transformers' ViTModel of the same width, depth, heads, patch and image size, without pooler."""
    vit_config = ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
    )
    return ViTModel(vit_config, add_pooling_layer=False)


def timm_reference(config: AceConfig) -> nn.Module:
    """timm's VisionTransformer or SwinTransformer of the same shape, without classifier."""
    if config.backbone_type == "swin":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.num_channels,
            num_classes=0,
            embed_dim=config.embed_dim,
            depths=tuple(config.depths),
            num_heads=tuple(config.num_heads),
            window_size=config.window_size,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
        )
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        num_classes=0,
        global_pool="avg",
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
    )


def benchmark_inference(config: AceConfig, batch_size: int, settings: Settings) -> dict[str, Any]:
    """Encoder forward (eval, no grad) of AceModel against the library models of the same shape, and
    AceModel's SDPA against its eager attention."""
    device = settings.device
    with device:
        models: dict[str, nn.Module] = {"ace": AceModel(config)}
        if config.backbone_type == "swin":  # AceModel's own SwinConfig, copied: each model sets its attention
            swin_config = copy.deepcopy(models["ace"].swin.config)
            models["reference"] = SwinModel(swin_config, add_pooling_layer=False)
        else:
            models["reference"] = vit_reference(config)
        timm_problem = "timm is not installed" if timm is None else None
        if timm is not None:
            try:
                models["timm"] = timm_reference(config)
            except Exception as error:  # an older timm without this shape: report, do not fail the run
                timm_problem = f"{type(error).__name__}: {error}"
    for name in ("ace", "reference"):
        set_attention(models[name], "sdpa")
    models["ace_eager"] = copy.deepcopy(models["ace"])
    set_attention(models["ace_eager"], "eager")
    pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, device=device)

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), settings.autocast():
                model(pixels)

        return run

    seconds = timed({name: forward(model.eval()) for name, model in models.items()}, settings)
    return {
        "attention": {name: attention_of(model) for name, model in models.items() if name != "timm"},
        "reference_model": type(models["reference"]).__name__,
        "timm_model": type(models["timm"]).__name__ if "timm" in models else None,
        "timm_problem": timm_problem,
        "ace_s": seconds["ace"],
        "reference_s": seconds["reference"],
        "ace_over_reference": seconds["ace"] / seconds["reference"],
        "timm_s": seconds.get("timm"),
        "ace_over_timm": seconds["ace"] / seconds["timm"] if "timm" in seconds else None,
        "eager_s": seconds["ace_eager"],
        "sdpa_over_eager": seconds["ace"] / seconds["ace_eager"],
        "images_per_s": batch_size / seconds["ace"],
    }


# ----------------------------------------------------------------------------------------------------------------
# One preset, the whole run, the report
# ----------------------------------------------------------------------------------------------------------------


def benchmark_preset(
    preset: str,
    config: AceConfig,
    batch_size: int,
    settings: Settings,
    peak: dict[str, float],
    view_cache: dict,
) -> dict[str, Any]:
    """Every part for one preset's recipe and configuration. A part that fails (out of memory above all) is
    recorded under `errors` and the others still run: the GPU run is one shot."""
    results: dict[str, Any] = {
        "batch_size": batch_size,
        "config": {
            "backbone_type": config.backbone_type,
            "image_size": config.image_size,
            "view_tokens": config.view_tokens,
            "feature_dim": config.feature_dim,
        },
    }
    errors: dict[str, str] = {}
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "training": lambda: benchmark_training(preset, config, batch_size, settings, peak["flops_per_s"]),
        "views": lambda: {
            "views": benchmark_views(
                config, settings, results.get("step", {}).get("images_per_s"), view_cache
            )
        },
        "inference": lambda: {"inference": benchmark_inference(config, batch_size, settings)},
    }
    if settings.compile:
        parts["compile"] = lambda: {"compile": benchmark_compile(preset, config, batch_size, settings)}
    for part, measure in parts.items():
        outcome = guarded(measure, settings.device)
        if "error" in outcome:
            errors[part] = outcome["error"]
        else:
            results |= outcome
    if errors:
        results["errors"] = errors
    return results


def guarded(measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """`measure()`, or {"error": what went wrong}; memory is released either way."""
    failure = None
    try:
        return measure()
    except Exception as error:  # recorded and printed: one failure must not end a one-shot run
        traceback.print_exc()
        kind = "out of memory" if is_out_of_memory(error) else type(error).__name__
        failure = f"{kind}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    finally:
        free_memory(device)
    free_memory(device)  # again, now that the traceback and the tensors its frames held are gone
    return {"error": failure}


def is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    cpu_wording = "can't allocate memory" in message
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or cpu_wording


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


# (row label, the preset part that measures it, cell renderer): top to bottom as in the module docstring.
ROWS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("view pairs per step (batch)", "", lambda r: f"{r['batch_size']}"),
    ("encoder parameters (M)", "training", lambda r: f"{r['parameters']['encoder'] / 1e6:.1f}"),
    ("full pretraining step (ms)", "training", lambda r: _ms(r["step"]["full_s"])),
    ("ideal step, encoders only (ms)", "training", lambda r: _ms(r["step"]["ideal_s"])),
    ("full / ideal", "training", lambda r: f"{r['step']['full_over_ideal']:.2f}"),
    ("view pairs / s", "training", lambda r: f"{r['step']['images_per_s']:.3g}"),
    ("step FLOPs, forward + backward (GFLOP)", "training", lambda r: f"{r['flops']['step'] / 1e9:.3g}"),
    ("achieved TFLOP/s", "training", lambda r: f"{r['flops']['achieved_flops_per_s'] / 1e12:.3g}"),
    (
        "MFU vs measured matmul peak (ideal step)",
        "training",
        lambda r: f"{r['flops']['mfu']:.1%} ({r['flops']['ideal_mfu']:.1%})",
    ),
    (
        "correspondence targets (ms, share of step)",
        "training",
        lambda r: f"{_ms(r['correspondence']['targets_s'])} ({r['correspondence']['fraction_of_step']:.2%})",
    ),
    ("weights + teacher + AdamW state (GiB)", "training", lambda r: f"{r['memory']['static_gib']:.2f}"),
    ("peak memory of a step (GiB)", "training", lambda r: f"{r['memory']['step_peak_gib']:.2f}"),
    (
        "... with gradient checkpointing (GiB)",
        "training",
        lambda r: f"{r['memory']['checkpointing_step_peak_gib']:.2f}",
    ),
    (
        "step with gradient checkpointing (ms, x full)",
        "training",
        lambda r: (
            f"{_ms(r['memory']['checkpointing_step_s'])} ({r['memory']['checkpointing_over_full']:.2f}x)"
        ),
    ),
    ("synthetic 16-bit source image (px)", "views", lambda r: f"{r['views']['source_side']}"),
    (
        "view pairs / s per CPU worker: all views on the worker / worker half only",
        "views",
        lambda r: f"{r['views']['cpu_path_images_per_s']:.3g} / {r['views']['worker_half_images_per_s']:.3g}",
    ),
    (
        "CPU workers to feed the step: views on the worker / on the device",
        "views",
        lambda r: (
            f"{r['views']['workers_needed_cpu_path']:.3g} / {r['views']['workers_needed_worker_half']:.3g}"
        ),
    ),
    (
        "views on the device: view pairs / s of the device half (time vs the step)",
        "views",
        lambda r: (
            f"{r['views']['device_half_images_per_s']:.3g} ({r['views']['device_half_fraction_of_step']:.1%})"
        ),
    ),
    ("inference, AceModel (ms)", "inference", lambda r: _ms(r["inference"]["ace_s"])),
    (
        "inference, transformers reference (ms)",
        "inference",
        lambda r: f"{_ms(r['inference']['reference_s'])} ({r['inference']['reference_model']})",
    ),
    ("AceModel / transformers", "inference", lambda r: f"{r['inference']['ace_over_reference']:.2f}"),
    ("inference, timm (ms)", "inference", lambda r: _ms(r["inference"]["timm_s"])),
    ("AceModel / timm", "inference", lambda r: f"{r['inference']['ace_over_timm']:.2f}"),
    ("inference, AceModel eager attention (ms)", "inference", lambda r: _ms(r["inference"]["eager_s"])),
    ("AceModel SDPA / eager", "inference", lambda r: f"{r['inference']['sdpa_over_eager']:.2f}"),
    (
        "step under torch.compile (ms, x eager; compilation s)",
        "compile",
        lambda r: (
            f"{_ms(r['compile']['compiled_step_s'])} ({r['compile']['compiled_over_eager']:.2f}x; "
            f"{r['compile']['compile_s']:.0f} s)"
        ),
    ),
]


def _cell(preset: dict[str, Any], part: str, render: Callable[[dict[str, Any]], str]) -> str:
    """One table cell: the failure where its part failed, 'n/a' where a value does not apply (None)."""
    error = preset.get("errors", {}).get(part)
    if error:
        return "out of memory" if error.startswith("out of memory") else "failed"
    try:
        return render(preset)
    except (KeyError, TypeError):  # None in the formula: not measured on this device
        return "n/a"


def markdown_report(results: dict[str, Any]) -> str:
    """The command, the machine, the matmul peak, one column per preset, and what the rows mean."""
    machine, peak, settings = results["machine"], results["matmul_peak"], results["settings"]
    gpu = "none"
    if machine["gpu"]:
        gpu = f"{machine['gpu']} ({machine['gpu_memory_gib']:.0f} GiB), CUDA {machine['cuda']}"
    presets = results["presets"]
    lines = [
        "# Pretraining benchmark",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"- CPU: {machine['cpu']}, {machine['cpu_count']} cores ({machine['torch_threads']} torch threads)",
        f"- GPU: {gpu}",
        f"- torch {machine['torch']}, transformers {machine['transformers']}, timm {machine['timm'] or 'n/a'}, "
        f"Python {machine['python']}",
        f"- device {machine['device']}, {machine['dtype']}; medians of {settings['repeats']} interleaved rounds "
        "after a warm-up",
        f"- matmul peak: {peak['flops_per_s'] / 1e12:.3g} TFLOP/s ({peak['size']}^3, {peak['dtype']})",
        "",
        "| | " + " | ".join(presets) + " |",
        "| --- |" + " --- |" * len(presets),
    ]
    for label, part, render in ROWS:
        cells = " | ".join(_cell(preset, part, render) for preset in presets.values())
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "Full step: forward on both views, backward, gradient clipping, AdamW (project parameter groups), "
        "teacher EMA. Ideal: the student encoder's forward and backward on [large; small] plus the teacher "
        "encoder's no-grad forward. MFU: counted FLOPs (FlopCounterMode) / step time / matmul peak. Views "
        "(no file decoding): a worker is one CPU thread running ViewPairCollator (all views on the worker) or "
        "ImageBatchCollator (its half when views are cut on the device); the device half is cut_batch_views on "
        "the benchmark device, its share = its time / the step's; workers = step view pairs/s / one worker's. "
        "Inference: encoder forward on a batch of the step's size, "
        "SDPA attention unless marked eager.",
    ]
    for name, preset in presets.items():
        for part, error in preset.get("errors", {}).items():
            lines.append(f"\n{name}, {part}: {error}")
        inference = preset.get("inference", {})
        if inference and inference["timm_s"] is None:
            lines.append(f"\n{name}: no timm model ({inference['timm_problem']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, config_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every preset and report; `config_overrides` (tests) shrinks the presets further."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks.bench_pretraining " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = resolve_settings(args)
    machine = describe_machine(settings)
    peak = matmul_peak(settings)
    presets: dict[str, dict[str, Any]] = {}
    view_cache: dict[str, dict] = {}
    results = {
        "command": command,
        "machine": machine,
        "settings": {
            "repeats": settings.repeats,
            "warmup_calls": settings.warmup + 1,
            "quick": settings.quick,
            "config_overrides": config_overrides or {},
        },
        "matmul_peak": peak,
        "presets": presets,
    }
    for name in args.presets:
        config = AceConfig.from_preset(name, **(config_overrides or {}))
        batch_size = settings.batch_for(name)
        print(f"benchmarking {name} at batch {batch_size} on {settings.device}", file=sys.stderr, flush=True)
        presets[name] = benchmark_preset(name, config, batch_size, settings, peak, view_cache)
        write_outputs(results, args)  # after every preset: a run cut short still leaves what it measured
    print(markdown_report(results))
    return results


def write_outputs(results: dict[str, Any], args: argparse.Namespace) -> None:
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")
    if args.output_md:
        args.output_md.parent.mkdir(parents=True, exist_ok=True)
        args.output_md.write_text(markdown_report(results))


def failed_unexpectedly(results: dict[str, Any]) -> bool:
    """Whether a part failed for another reason than memory: a bug, worth a failing exit status."""
    errors = [error for preset in results["presets"].values() for error in preset.get("errors", {}).values()]
    return any(not error.startswith("out of memory") for error in errors)


if __name__ == "__main__":
    sys.exit(1 if failed_unexpectedly(main()) else 0)
