"""Train the proxy model on generated clips: stage 1 the VAE, stage 2 the VACE transformer (flow matching).

    python -m hetcache.proxy.train --out trained/ [--init EARLIER_RUN] [--vae-seconds 150 --dit-seconds 330]

The shipped model took eight such runs, each started from the last (`--init` warm-starts from the saved float16
weights; optimiser, EMA and learning-rate warm-up start afresh): docs/PROXY.md lists the exact commands.

Each stage runs for a wall-clock budget: after a short probe the step count is fixed from the measured step time
and written to the log, so `--vae-steps/--dit-steps` with the logged counts replays a run step for step. Stage 2
keeps a pool of encoded clips and replaces `refresh` of them every `refresh_every` steps, because encoding a clip
with the VAE is slow (the first pool of 2,048 clips took 47 s on an H100, 23 ms a clip). The transformer keeps
an exponential moving average of its weights; the average is what gets saved. Outputs: `vae/` and `transformer/` (diffusers folders, float16, shards of at most 15 MB) and
`train_log.json` (configuration, loss curves, latent statistics, held-out PSNR).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetcache.proxy.architecture import (
    FRAMES,
    HEIGHT,
    TRAINING_PROMPTS,
    WIDTH,
    build_proxy_pipeline,
    control_latents,
    encode,
)
from hetcache.proxy.scenes import generate_scenes

PROBE_STEPS = (5, 69)  # the step time is measured between these steps (a multiple of the pool's refresh period)
OVERRUN = 1.1  # a timed stage stops at this multiple of its budget even if the probe promised more steps
WARMUP_STEPS = 100
SHARD_SIZE = "15MB"


@dataclass
class TrainConfig:
    seed: int = 0  # builds the text encoder (fixed for a model's life) and, without data_seed, seeds the data
    data_seed: int | None = None  # a warm-started run draws new clips and noise with its own data_seed
    frames: int = FRAMES
    height: int = HEIGHT
    width: int = WIDTH
    vae_seconds: float = 150.0
    vae_steps: int | None = None
    vae_batch: int = 32
    vae_frames: int = 5
    vae_size: int = 128
    vae_lr: float = 1e-3
    latent_weight: float = 1e-4
    dit_seconds: float = 330.0
    dit_steps: int | None = None
    dit_batch: int = 32
    dit_lr: float = 5e-4
    mask_weight: float = 2.0
    sigma_shift: float = 1.0
    compile: bool = False
    pool: int = 2048
    refresh: int = 32
    refresh_every: int = 8
    ema: float = 0.999
    stats_clips: int = 64
    eval_clips: int = 8
    eval_steps: int = 20
    log_every: int = 50


@dataclass
class StageLog:
    steps: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0
    curve: list[list[float]] = field(default_factory=list)  # [step, seconds, mean loss since last entry]
    planned_steps: int = 0  # the count fixed after the probe (or given)
    extra: dict = field(default_factory=dict)  # stage-specific facts (e.g. the time spent filling a pool)


def learning_rate(step: int, total: int | None, peak: float) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine decay to a tenth of the peak at `total`."""
    if step < WARMUP_STEPS or total is None:
        return peak * min(1.0, (step + 1) / WARMUP_STEPS)
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def noise_levels(count: int, shift: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Logit-normal noise levels in (0, 1), shifted the way the sampler shifts its schedule
    (sigma -> shift sigma / (1 + (shift - 1) sigma)).

    With the scheduler's flow_shift of 3, half of a 20-step edit runs above sigma 0.75, where an unshifted
    logit-normal puts only 14 % of the training samples; `shift` = flow_shift trains where inference spends its steps.
    """
    sigma = torch.sigmoid(torch.randn(count, generator=generator, device=device))
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(
    name: str,
    step_fn: Callable[[int, float], torch.Tensor],
    fixed_steps: int | None,
    seconds: float,
    peak_lr: float,
    device: torch.device,
    log_every: int,
) -> StageLog:
    """Run `step_fn(step, lr) -> loss` until the step count (given, or fixed from the probe's timing) is reached.

    A timed stage also stops at OVERRUN times its budget, so a probe that ran faster than the steps after it
    cannot push a run past its machine's time limit; `steps` then falls short of `planned_steps`.
    """
    log = StageLog()
    total = fixed_steps
    start = time.perf_counter()
    probe_start = start
    running, count = 0.0, 0
    step = 0
    while total is None or step < total:
        if fixed_steps is None and time.perf_counter() - start > OVERRUN * seconds:
            print(f"[{name}] stopped at step {step} of {total}: over {OVERRUN} x the {seconds:.0f}s budget", flush=True)
            break
        loss = step_fn(step, learning_rate(step, total, peak_lr))
        running += float(loss)
        count += 1
        step += 1
        if step == PROBE_STEPS[0]:
            _sync(device)
            probe_start = time.perf_counter()
        if step == PROBE_STEPS[1]:
            _sync(device)
            now = time.perf_counter()
            log.step_seconds = (now - probe_start) / (PROBE_STEPS[1] - PROBE_STEPS[0])
            if total is None:
                total = max(step + 1, step + int((seconds - (now - start)) / log.step_seconds))
        if step % log_every == 0 or step == total:
            elapsed = time.perf_counter() - start
            log.curve.append([step, round(elapsed, 2), running / count])
            print(f"[{name}] step {step}/{total or '?'} loss {running / count:.5f} {elapsed:.0f}s", flush=True)
            running, count = 0.0, 0
    _sync(device)
    log.steps, log.seconds, log.planned_steps = step, time.perf_counter() - start, total or step
    return log


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(vae: torch.nn.Module, config: TrainConfig, device: torch.device, generator: torch.Generator) -> StageLog:
    """Reconstruction (L1 + L2) through the posterior mode, on whole scenes and on their masked halves.

    The pipeline only ever uses the mode (it encodes with `sample_mode="argmax"`), so the VAE is trained as a
    plain autoencoder: sampling the posterior, as a KL-regularised VAE would, buries the latents in noise that a
    short training cannot learn away. A small penalty on the latents' magnitude keeps their scale in check.

    The pipeline encodes `video * (1 - mask)` and `video * mask`, so a quarter of the samples are the first (sharp
    mask borders) and a sixth the second (with the masked region hidden, a nearly empty clip).
    """
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    size, frames, batch = config.vae_size, config.vae_frames, config.vae_batch

    def step_fn(step: int, lr: float) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = lr
        clip = generate_scenes(batch, frames, size, size, generator, device)
        hidden = clip.mask.to(clip.video.dtype)
        kind = torch.rand(batch, 1, 1, 1, 1, generator=generator, device=device)
        x = torch.where(kind < 0.25, clip.video * (1 - hidden), torch.where(kind < 0.42, clip.video * hidden, clip.target))
        with _autocast(device):
            latents = vae.encode(x).latent_dist.mode()
            reconstruction = vae.decode(latents).sample
        error = reconstruction.float() - x
        loss = error.abs().mean() + error.square().mean() + config.latent_weight * latents.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    log = run_stage("vae", step_fn, config.vae_steps, config.vae_seconds, config.vae_lr, device, config.log_every)
    vae.eval().requires_grad_(False)
    return log


@torch.no_grad()
def set_latent_stats(vae: torch.nn.Module, config: TrainConfig, device: torch.device, generator: torch.Generator) -> None:
    """Per-channel mean and std of the latents of full-size clips, written into the VAE config (the pipeline
    normalises latents with them)."""
    z_dim = vae.config.z_dim
    vae.register_to_config(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    latents = []
    for _ in range(max(1, config.stats_clips // 8)):
        clip = generate_scenes(min(8, config.stats_clips), config.frames, config.height, config.width, generator, device)
        with _autocast(device):
            latents.append(encode(vae, clip.target).float())
    stacked = torch.cat(latents).transpose(0, 1).flatten(1)
    vae.register_to_config(
        latents_mean=stacked.mean(1).tolist(), latents_std=stacked.std(1).clamp_min(1e-4).tolist()
    )


def train_transformer(pipe, config: TrainConfig, device: torch.device, generator: torch.Generator) -> StageLog:
    """Flow matching on the masked video-to-video task: x_t = (1 - s) x0 + s noise, target noise - x0.

    s is logit-normal, shifted by `sigma_shift` (`noise_levels`); the loss weighs latent cells that touch the
    mask (1 + mask_weight) times higher, since the kept region is nearly given by the conditioning. With
    `compile` the training step runs the transformer through `torch.compile`; if compiling fails on the first
    step, training goes on uncompiled and the log says why.
    """
    vae, transformer = pipe.vae, pipe.transformer
    prompts = torch.cat(
        [
            pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                max_sequence_length=pipe.tokenizer.model_max_length, device=device,
            )[0]
            for prompt in TRAINING_PROMPTS
        ]
    )

    @torch.no_grad()
    def encoded(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip = generate_scenes(count, config.frames, config.height, config.width, generator, device)
        with _autocast(device):
            return encode(vae, clip.target).bfloat16(), control_latents(vae, clip.video, clip.mask).bfloat16()

    fill_start = time.perf_counter()
    pool_x0, pool_control = map(torch.cat, zip(*(encoded(min(32, config.pool)) for _ in range(-(-config.pool // 32)))))
    pool_x0, pool_control = pool_x0[: config.pool], pool_control[: config.pool]
    fill_seconds = time.perf_counter() - fill_start
    print(f"[transformer] pool of {len(pool_x0)} encoded clips ready in {fill_seconds:.0f}s", flush=True)

    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.dit_lr, weight_decay=0.01)
    average = [p.detach().clone() for p in transformer.parameters()]
    batch = config.dit_batch
    extra: dict = {"compiled": bool(config.compile)}
    forward = torch.compile(transformer) if config.compile else transformer

    def step_fn(step: int, lr: float) -> torch.Tensor:
        nonlocal forward
        try:
            return train_step(forward, step, lr)
        except Exception as error:  # noqa: BLE001 -- any compiler failure on the first step: train on without it
            if step > 0 or forward is transformer:
                raise
            print(f"[transformer] torch.compile failed, training uncompiled: {error!r:.300}", flush=True)
            extra.update(compiled=False, compile_error=repr(error)[:300])
            forward = transformer
            return train_step(forward, step, lr)

    def train_step(model: Callable, step: int, lr: float) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % config.refresh_every == config.refresh_every - 1:
            slots = torch.randint(0, len(pool_x0), (config.refresh,), generator=generator, device=device)
            pool_x0[slots], pool_control[slots] = encoded(config.refresh)
        index = torch.randint(0, len(pool_x0), (batch,), generator=generator, device=device)
        x0, control = pool_x0[index].float(), pool_control[index].float()
        noise = torch.randn(x0.shape, generator=generator, device=device)
        sigma = noise_levels(batch, config.sigma_shift, generator, device)
        s = sigma.view(batch, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        text = prompts[torch.randint(0, len(prompts), (batch,), generator=generator, device=device)]
        with _autocast(device):
            prediction = model(
                hidden_states=noisy,
                timestep=sigma * 1000.0,
                encoder_hidden_states=text,
                control_hidden_states=control,
                return_dict=False,
            )[0]
        mask_cells = control[:, 2 * vae.config.z_dim :]
        weight = 1.0 + config.mask_weight * mask_cells.float().amax(1, keepdim=True)
        loss = (weight * (prediction.float() - (noise - x0)).square()).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(average, [p.detach() for p in transformer.parameters()], 1 - decay)
        return loss.detach()

    seconds = config.dit_seconds - fill_seconds  # the budget covers filling the pool too
    log = run_stage("transformer", step_fn, config.dit_steps, seconds, config.dit_lr, device, config.log_every)
    log.extra = {"pool_clips": len(pool_x0), "pool_seconds": fill_seconds, **extra}
    with torch.no_grad():
        for param, mean in zip(transformer.parameters(), average):
            param.copy_(mean)
    transformer.eval().requires_grad_(False)
    return log


@torch.no_grad()
def reconstruction_psnr(vae: torch.nn.Module, config: TrainConfig, clips: int = 4) -> float:
    """Mean PSNR (dB) of the VAE's encode-decode round trip on held-out clips: the ceiling of any edit."""
    from hetcache.metrics import psnr
    from hetcache.proxy.architecture import decode
    from hetcache.proxy.quality import held_out_clips, to_uint8

    values = []
    for clip in held_out_clips(clips, config.frames, config.height, config.width):
        target = torch.from_numpy(clip.target).permute(3, 0, 1, 2)[None].to(vae.device, torch.float32) / 127.5 - 1
        round_trip = decode(vae, encode(vae, target))[0].clamp(-1, 1).cpu()
        values.append(psnr(to_uint8(round_trip), clip.target))
    return float(np.mean(values))


def held_out_quality(pipe, config: TrainConfig) -> dict:
    """Mean PSNR inside the mask on held-out clips: the trained model (20 steps, no CFG) and the median fill."""
    from hetcache.pipeline import run_edit
    from hetcache.proxy.quality import (
        EDIT_PROMPT,
        held_out_clips,
        mask_psnr,
        median_fill,
    )

    model, baseline = [], []
    for clip in held_out_clips(config.eval_clips, config.frames, config.height, config.width):
        result = run_edit(pipe, clip.video, clip.mask, EDIT_PROMPT, steps=config.eval_steps, guidance=1.0)
        model.append(mask_psnr(result.frames, clip))
        baseline.append(mask_psnr(median_fill(clip.video, clip.mask), clip))
    return {"model_psnr_mask": model, "median_fill_psnr_mask": baseline,
            "mean_model": float(np.mean(model)), "mean_median_fill": float(np.mean(baseline))}


def save_half(module: torch.nn.Module, folder: Path) -> None:
    """A float16 copy in diffusers format, sharded so no file passes SHARD_SIZE."""
    copy.deepcopy(module).to(torch.float16).save_pretrained(folder, max_shard_size=SHARD_SIZE)


def load_trained(pipe, folder: Path) -> None:
    """Start from an earlier run's weights in `folder`: its VAE (with latent statistics) and, if it trained one,
    its transformer."""
    from diffusers import AutoencoderKLWan, WanVACETransformer3DModel

    device = pipe.transformer.device
    pipe.vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(device).eval()
    if (folder / "transformer").is_dir():
        pipe.transformer = WanVACETransformer3DModel.from_pretrained(
            folder / "transformer", torch_dtype=torch.float32
        ).to(device).eval()


@torch.enable_grad()  # whatever the caller's grad mode
def train(config: TrainConfig, out: Path, device: torch.device, init: Path | None = None) -> dict:
    """Both stages, the latent statistics, the held-out check and the saved weights; returns the log.

    With `init`, training starts from that run's weights; `vae_steps=0` then keeps its VAE and statistics.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)
    generator = torch.Generator(device).manual_seed(config.seed if config.data_seed is None else config.data_seed)
    pipe = build_proxy_pipeline(config.seed).to(device)
    if init is not None:
        load_trained(pipe, init)
    log: dict = {"command": " ".join(sys.argv), "config": asdict(config), "init": init and str(init),
                 "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    vae_log = train_vae(pipe.vae, config, device, generator)
    if init is None or config.vae_steps != 0:
        set_latent_stats(pipe.vae, config, device, generator)
    log["vae"] = asdict(vae_log)
    log["vae_psnr"] = reconstruction_psnr(pipe.vae, config)
    log["latents_mean"], log["latents_std"] = pipe.vae.config.latents_mean, pipe.vae.config.latents_std
    out.mkdir(parents=True, exist_ok=True)
    save_half(pipe.vae, out / "vae")
    (out / "train_log.json").write_text(json.dumps(log, indent=1))

    if config.dit_steps != 0:
        log["transformer"] = asdict(train_transformer(pipe, config, device, generator))
        save_half(pipe.transformer, out / "transformer")
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    if config.eval_clips > 0:
        log["held_out"] = held_out_quality(pipe, config)
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def _flag(text: str) -> bool:
    """A boolean option is given as 0 or 1 (`--compile 1`), like every other option a value."""
    return bool(int(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--init", type=Path, default=None, help="start from this earlier output folder")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        kind = _flag if isinstance(value, bool) else float if isinstance(value, float) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    args = vars(parser.parse_args(argv))
    out, device, init = args.pop("out"), torch.device(args.pop("device")), args.pop("init")
    log = train(TrainConfig(**args), out, device, init)
    print(f"VAE round trip on held-out clips: {log['vae_psnr']:.2f} dB PSNR")
    if "held_out" in log:
        held_out = log["held_out"]
        print(f"held-out PSNR in mask: model {held_out['mean_model']:.2f} dB, "
              f"median fill {held_out['mean_median_fill']:.2f} dB")


if __name__ == "__main__":
    main()
