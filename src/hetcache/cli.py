"""The `hetcache` command line: `edit` a masked region of a video, run the built-in `demo`, `bench` the caches
against each other on a video, `sweep` each over a grid of its knob on one or more clips, or preview their step
`plan`s.

The commands only parse options, call `video`, `pipeline`, `bench` and `hetcache.enable`, and report. Any
`UserError` ends the command with one `error: ...` line on stderr and exit code 2, as do typer's own usage errors.
torch and diffusers load only once a command needs them (`pipeline` imports them lazily, `hetcache.enable`
resolves on first use, `bench` and `hetcache.methods` are imported inside the commands), so `--help` and the
input checks that come before loading a model answer at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import click
import numpy as np
import typer
from tqdm import tqdm

import hetcache
from hetcache import files, launch
from hetcache import video as vio
from hetcache.errors import UserError
from hetcache.options import parse_grids, parse_method_options
from hetcache.pipeline import (
    DEFAULT_MODEL,
    PROXY,
    TINY_RANDOM,
    TINY_RANDOM_MOE,
    EditResult,
    check_guidance,
    check_prompt,
    default_guidance,
    default_steps,
    is_two_expert,
    load_pipeline,
    prepare_for_model,
    resolve_device,
    resolve_dtype,
    run_edit,
)

USER_ERROR_EXIT = 2
DEMO_PROMPT = "remove the object"
NO_CACHE = "full"
DEMO_METHOD = "hetcache-fast"
DEMO_SCENE = 3
DEMO_FRAMES, DEMO_SIZE = 17, 256  # the proxy's native clip
# The names of `hetcache.methods`, repeated here because importing it loads torch and diffusers, which `--help` and
# a mistyped name must not wait for; tests/test_cli.py checks that both lists agree.
OWN_METHODS = ("full", "fewer-steps", "teacache", "pab", "adacache", "fastcache-style", "hetcache-slow",
               "hetcache-fast")
TUNABLE_METHODS = ("hetcache",)
PEER_METHODS = ("diffusers-fbc", "diffusers-magcache", "cache-dit")
METHOD_NAMES = OWN_METHODS + TUNABLE_METHODS + PEER_METHODS
BENCH_METHODS = ",".join(OWN_METHODS)
# `hetcache.sweep.DEFAULT_METHODS`, repeated for the same reason (tests/test_cli.py checks they agree).
SWEEP_METHODS = "fewer-steps,hetcache,teacache,pab,adacache,fastcache-style,diffusers-fbc,diffusers-magcache,cache-dit"
METHOD_HELP = (
    f"Cache to run: {NO_CACHE} (none), hetcache-fast, hetcache-slow, hetcache (set its knobs with --method-option), "
    f"or a baseline ({', '.join(n for n in METHOD_NAMES if n != NO_CACHE and not n.startswith('hetcache'))})."
)
METHODS_HELP = (
    f"Comma-separated methods, or all; full always runs first as the reference. Names: {', '.join(METHOD_NAMES)}."
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(typer.core.TyperGroup):
    """Turns a UserError from any command, and click's usage errors (a missing option, a value out of range),
    into one `error:` line on stderr and exit code 2 (also under CliRunner)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            typer.echo(f"error: {_one_line(error)}", err=True)
            ctx.exit(USER_ERROR_EXIT)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.exceptions.TyperException as error:  # typer's click errors: usage, bad values
            context = getattr(error, "ctx", None)
            hint = f": see {context.command_path} --help" if context is not None else ""
            typer.echo(f"error: {_one_line(error.format_message()).rstrip('.')}{hint}", err=True)
            code = error.exit_code
        except typer.Abort:
            typer.echo("error: interrupted", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    help="Fast masked video editing with Wan2.1-VACE.",
)


@app.callback()
def _root(ctx: typer.Context) -> None:
    """`hetcache` alone prints the help (as text: click's no-args error would be a usage error)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


# Options shared by several commands.
ModelOpt = Annotated[
    str,
    typer.Option(help=f"Hub id, local pipeline folder, {PROXY} (small trained model, CPU), {TINY_RANDOM} or "
                 f"{TINY_RANDOM_MOE} (tiny random weights, one or two experts: plumbing only)."),
]
SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes
SeedOpt = Annotated[
    int, typer.Option(min=0, max=SEED_MAX, help="Noise seed, 0 to 2^64-1 (every method and run of a clip starts "
                      "from the same initial latents).")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16.")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Denoising steps.")]
WidthOpt = Annotated[int | None, typer.Option(help="Model width (multiple of 16); default from the source.")]
HeightOpt = Annotated[int | None, typer.Option(help="Model height (multiple of 16); default from the source.")]
ModelGuidanceOpt = Annotated[
    float | None,
    typer.Option(help="Classifier-free guidance scale (<= 1 turns it off); default 5, or 1 for the proxy."),
]
Guidance2Opt = Annotated[
    float | None,
    typer.Option("--guidance-2", help="Guidance of the second expert of a two-expert pipeline (Wan2.2's "
                 "guidance_scale_2); default the same as --guidance."),
]
MethodsOpt = Annotated[str, typer.Option(help=METHODS_HELP)]
NegativeOpt = Annotated[str, typer.Option(help="What to steer away from.")]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="What the masked region should show.")]
DatasetPromptOpt = Annotated[
    str | None,
    typer.Option("--prompt", "-p", help="What the masked region should show; for a dataset, the prompt of items "
                 "without one."),
]
LayoutOpt = Annotated[str, typer.Option(help="Dataset layout: folder, vace-benchmark or vpbench.")]
ModelStepsOpt = Annotated[int | None, typer.Option(min=1, help="Denoising steps; default 50, or 20 for the proxy.")]
FramesOpt = Annotated[
    int | None, typer.Option(help="Frames to edit (4k+1); default as many as fit, up to 81 (17 for the proxy).")
]
VideoArg = Annotated[Path, typer.Argument(help="Input video file, folder of frames, or image.")]
MaskOpt = Annotated[Path | None, typer.Option(help="Mask video, folder or image (white = generate).")]
BoxOpt = Annotated[
    str | None, typer.Option(help="Box to generate instead of a mask: x0,y0,x1,y1 in source pixels.")
]
MethodOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--method-option",
        help="NAME.KEY=VALUE: set an option of a method's config, e.g. teacache.delta=0.05 (repeatable; "
        "docs/CLI.md lists the keys).",
    ),
]
# `hetcache.config.CACHE_DEVICES`, and the storage dtypes offered on the command line (tests/test_cli.py checks
# that HetCacheConfig takes each of them).
CACHE_DEVICES = ("auto", "cuda", "cpu")
CACHE_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2")
CacheDeviceOpt = Annotated[
    str | None,
    typer.Option(help="Where HetCache keeps its K/V cache: auto (the GPU when it fits, else the host), cuda or cpu "
                 "(pinned host memory, streamed per layer); the HetCache methods only."),
]
CacheDtypeOpt = Annotated[
    str | None,
    typer.Option(help=f"Storage dtype of HetCache's K/V cache ({', '.join(CACHE_DTYPES)}); default the model's. "
                 "float8 halves the cache of bf16; attention still reads the compute dtype."),
]
CONFIG_METHOD = "hetcache"  # the method whose config `--config` sets (`hetcache.calibrate.METHOD`)
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A HetCache config file (JSON: the chosen.json of hetcache calibrate, or HetCacheConfig.to_dict()) "
        "for the hetcache method; the cache flags and --method-option hetcache.KEY=VALUE override its fields.",
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the dense reference and every method the same way (block forwards; HetCache's row "
        "maths); speedups compare compiled with compiled.",
    ),
]


@dataclass
class EditRequest:
    """Everything one edit needs, shared by `edit` and `demo`."""

    video: Path
    mask: Path | None
    box: str | None
    prompt: str
    output: Path
    side_by_side: Path | None
    negative_prompt: str = ""
    model: str = DEFAULT_MODEL
    steps: int = 50
    frames: int | None = None
    stride: int = 1
    height: int | None = None
    width: int | None = None
    seed: int = 0
    guidance: float = 5.0
    device: str = "auto"
    dtype: str = "auto"
    crf: int = 18
    lossless: bool = False
    composite: bool = True
    hide_masked: bool = True
    method: str = NO_CACHE
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    guidance_2: float | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # {"cache_device": ..., "cache_dtype": ...}


def cache_settings(cache_device: str | None, cache_dtype: str | None) -> dict[str, str]:
    """`--cache-device` and `--cache-dtype`, checked, as HetCacheConfig options (only those given)."""
    given = {"cache_device": check_cache_device(cache_device), "cache_dtype": check_cache_dtype(cache_dtype)}
    return {key: value for key, value in given.items() if value is not None}


def config_file(path: Path | None, names: Sequence[str]) -> dict[str, Any]:
    """The hetcache method's options that the config file `path` (`--config`) gives ({} without one;
    `hetcache.calibrate.config_options`). A file that is not a HetCache config, or no hetcache among the methods
    `names` run, is a UserError."""
    if path is None:
        return {}
    if CONFIG_METHOD not in names:
        raise UserError(f"--config {path} sets the {CONFIG_METHOD} method's config, and {CONFIG_METHOD} is not "
                        f"among the methods run ({', '.join(names)}): add it to the methods or drop --config")
    from hetcache.calibrate import config_options

    return config_options(path)


def with_config_file(fields: dict[str, Any], options: dict[str, dict[str, Any]],
                     cache: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`options` ({method: {key: value}}) with a config file's `fields` (`config_file`) under the hetcache
    method's: the file's values, then the cache flags (`cache`), then `--method-option hetcache.KEY=VALUE`."""
    if not fields:
        return options
    from hetcache.options import over_config

    return {**options, CONFIG_METHOD: over_config(fields, {**cache, **options.get(CONFIG_METHOD, {})})}


def _method_names(methods: str) -> list[str]:
    """The names of a `--methods` list, checked (`all`: every method)."""
    if methods.strip() == "all":
        return list(METHOD_NAMES)
    return [check_method(name.strip()) for name in methods.split(",") if name.strip()]


def _guidance(model: str, given: float | None) -> float:
    """The guidance scale asked for (a finite number), or the model's default (`default_guidance`) when none was."""
    if given is None:
        return default_guidance(model)
    check_guidance(given)
    return given


def check_method(name: str) -> str:
    """The name itself, or a UserError listing the valid ones (without importing `hetcache.methods`)."""
    if name not in METHOD_NAMES:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHOD_NAMES)}")
    return name


def check_cache_device(name: str | None) -> str | None:
    """`--cache-device`, checked without importing torch."""
    if name is not None and name not in CACHE_DEVICES:
        raise UserError(f"unknown --cache-device {name!r}: use one of {', '.join(CACHE_DEVICES)}")
    return name


def check_cache_dtype(name: str | None) -> str | None:
    """`--cache-dtype`, checked without importing torch."""
    if name is not None and name not in CACHE_DTYPES:
        raise UserError(f"unknown --cache-dtype {name!r}: use one of {', '.join(CACHE_DTYPES)}")
    return name


def method_options(texts: list[str] | None) -> dict[str, dict[str, Any]]:
    """`--method-option` values as {method: {key: value}}: syntax and method names checked (no torch yet)."""
    return parse_method_options(texts or [], METHOD_NAMES)


def method_config(name: str, options: dict[str, dict[str, Any]] | None = None, steps: int | None = None,
                  cache: dict[str, Any] | None = None) -> Any:
    """The config of method `name` for `hetcache.enable`, with the user's options and cache settings
    (`--cache-device`, `--cache-dtype`) for a run of `steps` steps, or None for `full` without options (the stock
    pipeline)."""
    cache = {key: value for key, value in (cache or {}).items() if value is not None}
    if check_method(name) == NO_CACHE and not options and not cache:
        return None
    from hetcache import methods
    from hetcache.runner import cache_options, method_configs

    reason = methods.unavailable_reason(name)
    if reason is not None:
        raise UserError(f"method {name!r} cannot run here: {reason}")
    return method_configs([name], steps=steps, options=cache_options([name], options, cache))[0][1]


@contextmanager
def step_bar(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr, and the `progress(done, total)` callback that `run_edit` drives it with."""
    with tqdm(total=total, desc=description, unit="step", file=sys.stderr) as bar:

        def progress(done: int, steps: int) -> None:
            if bar.total != steps:  # the solver steps that run, once the pipeline knows them
                bar.total = steps
                bar.refresh()
            bar.update(done - bar.n)

        yield progress


def run_request(request: EditRequest) -> None:
    """Check every input and the output paths, prepare the inputs, load the model, enable the method's cache, edit,
    write the outputs and print the summary. An empty mask writes the input through without loading the model."""
    check_prompt(request.prompt)
    check_method(request.method)
    check_guidance(request.guidance, request.guidance_2)
    outputs = [request.output] + ([request.side_by_side] if request.side_by_side is not None else [])
    for path in outputs:
        if path.is_dir():
            raise UserError(f"output {path} is a folder: give a file name such as {path / 'out.mp4'}")
        vio.container_format(path)
    if len({path.resolve() for path in outputs}) < len(outputs):
        raise UserError(f"--side-by-side and -o are both {request.output}: give them different paths")
    files.check_not_inputs(outputs, {"input video": request.video, "mask": request.mask})
    prepared = prepare_for_model(
        request.model, request.video, request.mask, request.box, request.frames, request.height, request.width,
        request.stride,
    )
    for folder in dict.fromkeys(path.parent for path in outputs):
        files.check_writable(folder)
    main = launch.is_main()  # under torchrun rank 0 alone reads the inputs, writes and reports
    if main and vio.has_audio(request.video):
        typer.echo(f"note: {request.video} has an audio track, which is not copied: the output is video only", err=True)
    num_frames, height, width = prepared.mask.shape
    described = vio.describe_source(request.video) if main else request.video
    source = f"input    {described} -> {width}x{height} x {num_frames} frames at {prepared.fps:g} fps"
    if not prepared.mask.any():
        if main:
            _write_outputs(request, prepared, prepared.video, [
                source, "method   none: the mask is empty, so there is nothing to edit (no model loaded)",
            ], "the input, unchanged")
        return

    start = time.perf_counter()  # "load" includes importing torch and diffusers, whichever step does it first
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    config = method_config(request.method, request.method_options, request.steps, request.cache)
    pipe = load_pipeline(request.model, device, dtype, height=height, width=width)
    load_s = time.perf_counter() - start
    from hetcache.runner import check_fit, describe_fit

    memory = [f"memory   {describe_fit(estimate, where, device)}" for estimate, where in
              check_fit(pipe, [(request.method, config)], num_frames, height, width, request.guidance).values()]

    result, cache_line, ran = _edit_with_method(pipe, config, prepared, request)
    if not main:
        return
    frames = vio.composite(prepared.video, result.frames, prepared.mask) if request.composite else result.frames
    timings = {"load": load_s, **result.timings}
    kept = "composited into the original outside the mask" if request.composite else "raw model output"
    guidance = f"guidance {request.guidance:g}"
    if request.guidance_2 is not None:
        guidance += f" (second expert {request.guidance_2:g})"
    _write_outputs(request, prepared, frames, [
        source,
        f"model    {request.model}, {result.steps} steps, {guidance}, seed {request.seed}, "
        f"{device.type}/{str(dtype).removeprefix('torch.')}",
        *_experts_line(pipe, ran),
        f"method   {request.method}: {cache_line}",
        *memory,
        "time     " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items()),
    ], kept)


def _experts_line(pipe: Any, steps: int) -> list[str]:
    """Where a two-expert pipeline switched in a run of `steps` solver steps (nothing for one expert)."""
    if not is_two_expert(pipe):
        return []
    switch = hetcache.expert_switch(pipe, steps)
    if switch is None:
        return [f"experts  transformer for all {steps} steps (transformer_2 ran none)"]
    first = {0: "", 1: "transformer for step 0, "}.get(switch, f"transformer for steps 0-{switch - 1}, ")
    return [f"experts  {first}transformer_2 from step {switch} of {steps}"]


def _write_outputs(request: EditRequest, prepared: vio.PreparedInputs, frames: np.ndarray, lines: list[str],
                   kept: str) -> None:
    """Write the output (and side-by-side) video and print the summary `lines` with the written paths."""
    written = vio.write_video(request.output, frames, prepared.fps, crf=request.crf, lossless=request.lossless)
    lines = [*lines, f"output   {written} ({kept})"]
    if request.side_by_side is not None:
        panel = vio.side_by_side(prepared.video, prepared.mask, frames)
        side = vio.write_video(request.side_by_side, panel, prepared.fps, crf=request.crf, lossless=request.lossless)
        lines.append(f"side     {side} (input | mask | output)")
    typer.echo("\n".join(lines))


def _edit_with_method(pipe: Any, config: Any, prepared: vio.PreparedInputs,
                      request: EditRequest) -> tuple[EditResult, str, int]:
    """Run the edit with `config`'s cache enabled (None: the stock pipeline); the result, the summary's text
    for the cache (executed plan letters and the analytic FLOPs ratio) and the solver steps that ran."""
    steps = request.steps
    if config is not None:
        from hetcache.methods import inference_steps

        steps = inference_steps(config, request.steps)

    def edit(progress: Callable[[int, int], None]) -> EditResult:
        return run_edit(
            pipe,
            prepared.video,
            prepared.mask,
            request.prompt,
            negative_prompt=request.negative_prompt,
            steps=steps,
            guidance=request.guidance,
            seed=request.seed,
            progress=progress,
            hide_masked=request.hide_masked,
            guidance_2=request.guidance_2,
        )

    if config is None:
        with step_bar("denoising", steps) as progress:
            return edit(progress), "no cache", steps

    if hasattr(config, "prepare"):  # e.g. MagCache calibrates its ratios on one uncached run
        with step_bar("calibrating", steps) as progress:
            config.prepare(pipe.transformer, steps, lambda: edit(progress))
    hetcache.enable(pipe, config)
    try:
        with step_bar("denoising", steps) as progress:
            result = edit(progress)
        stats = hetcache.stats(pipe)
    finally:
        hetcache.disable(pipe)
    for note in stats.notes:
        typer.echo(f"note: {request.method}: {note}", err=True)
    # Relative to the dense cost of the steps asked for, so fewer-steps shows its saving too (HetCache's stats
    # already count every requested step as dense).
    dense = stats.dense_flops * request.steps / (stats.requested_steps or steps)
    cost = f"{stats.flops / dense:.2f} of the dense FLOPs (analytic)" if dense > 0 else "FLOPs not observed"
    ran = len(stats.plan) or steps
    counted = f"{ran} steps" if ran == request.steps else f"{ran} of {request.steps} steps"
    return result, f"plan {stats.plan or '-'} ({counted}), {cost}", ran


def _side_by_side_path(output: Path, side_by_side: Path | None, no_side_by_side: bool) -> Path | None:
    if no_side_by_side and side_by_side is not None:
        raise UserError("--side-by-side and --no-side-by-side conflict: give one of them")
    if no_side_by_side:
        return None
    return side_by_side or output.with_name(f"{output.stem}_side_by_side.mp4")


@app.command()
def edit(
    video: VideoArg,
    prompt: PromptOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output mp4.")],
    mask: MaskOpt = None,
    box: BoxOpt = None,
    negative_prompt: NegativeOpt = "",
    model: ModelOpt = DEFAULT_MODEL,
    steps: ModelStepsOpt = None,
    frames: FramesOpt = None,
    stride: Annotated[int, typer.Option(min=1, help="Take every stride-th source frame.")] = 1,
    height: HeightOpt = None,
    width: WidthOpt = None,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    crf: Annotated[int, typer.Option(min=0, max=51, help="H.264 quality (lower is better).")] = 18,
    lossless: Annotated[
        bool, typer.Option("--lossless", help="Write lossless RGB H.264 (exact pixels, less portable).")
    ] = False,
    composite: Annotated[
        bool, typer.Option("--composite/--no-composite", help="Keep the original pixels outside the mask.")
    ] = True,
    hide_masked: Annotated[
        bool,
        typer.Option(
            "--hide-masked/--show-masked",
            help="Grey out the masked pixels before the model sees them (removal, inpainting); --show-masked "
            "passes them on, for edits that start from the original content.",
        ),
    ] = True,
    side_by_side: Annotated[
        Path | None, typer.Option(help="Input | mask | output video; default OUT_side_by_side.mp4.")
    ] = None,
    no_side_by_side: Annotated[
        bool, typer.Option("--no-side-by-side", help="Do not write the side-by-side video.")
    ] = False,
    method: Annotated[
        str | None, typer.Option(help=METHOD_HELP + f" Default {NO_CACHE}, or {CONFIG_METHOD} with --config.")
    ] = None,
    method_option: MethodOptionOpt = None,
    guidance_2: Guidance2Opt = None,
    cache_device: CacheDeviceOpt = None,
    cache_dtype: CacheDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Regenerate the masked region of VIDEO as PROMPT describes."""
    method = method or (CONFIG_METHOD if config is not None else NO_CACHE)
    cache = cache_settings(cache_device, cache_dtype)
    options = with_config_file(config_file(config, [check_method(method)]), method_options(method_option), cache)
    run_request(
        EditRequest(
            video=video,
            mask=mask,
            box=box,
            prompt=prompt,
            output=output,
            side_by_side=_side_by_side_path(output, side_by_side, no_side_by_side),
            negative_prompt=negative_prompt,
            model=model,
            steps=default_steps(model) if steps is None else steps,
            frames=frames,
            stride=stride,
            height=height,
            width=width,
            seed=seed,
            guidance=_guidance(model, guidance),
            device=device,
            dtype=dtype,
            crf=crf,
            lossless=lossless,
            composite=composite,
            hide_masked=hide_masked,
            method=method,
            method_options=options,
            guidance_2=guidance_2,
            cache=cache,
        )
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for input.mp4, mask.mp4, output.mp4 and side_by_side.mp4.")] = Path(
        "demo_out"
    ),
    model: ModelOpt = PROXY,
    prompt: PromptOpt = DEMO_PROMPT,
    steps: StepsOpt = 20,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = DEMO_METHOD,
    scene: Annotated[
        int, typer.Option(min=0, max=SEED_MAX, help="Which generated scene to edit (a seed).")
    ] = DEMO_SCENE,
) -> None:
    """Remove a moving red ball from a scene made in code, with the small trained proxy model (under a minute
    on a laptop CPU)."""
    check_method(method)
    check_prompt(prompt)
    guidance = _guidance(model, guidance)
    files.check_output_folder(out)
    from hetcache.proxy.quality import to_uint8
    from hetcache.proxy.scenes import removal_scene

    video, hidden, _ = removal_scene(DEMO_FRAMES, DEMO_SIZE, DEMO_SIZE, seed=scene)
    clip, mask = to_uint8(video[0]), hidden[0, 0].numpy()
    fps = 8.0
    source = vio.write_video(out / "input.mp4", clip, fps)
    mask_path = vio.write_mask_video(out / "mask.mp4", mask, fps)
    run_request(
        EditRequest(
            video=source,
            mask=mask_path,
            box=None,
            prompt=prompt,
            output=out / "output.mp4",
            side_by_side=out / "side_by_side.mp4",
            model=model,
            steps=steps,
            seed=seed,
            guidance=guidance,
            device=device,
            dtype=dtype,
            method=method,
        )
    )


@app.command()
def bench(
    video: VideoArg,
    prompt: PromptOpt,
    out: Annotated[Path, typer.Option(help="Folder for results.json/.csv/.md, pareto.png and side_by_side.mp4.")],
    mask: MaskOpt = None,
    box: BoxOpt = None,
    methods: MethodsOpt = BENCH_METHODS,
    negative_prompt: NegativeOpt = "",
    model: ModelOpt = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps (fewer-steps runs a share of them).")] = 50,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    lpips_weights: Annotated[
        Path | None, typer.Option(help="LPIPS weights (a state dict file); without it LPIPS is not computed.")
    ] = None,
    method_option: MethodOptionOpt = None,
    compile: CompileOpt = False,
    guidance_2: Guidance2Opt = None,
    cache_device: CacheDeviceOpt = None,
    cache_dtype: CacheDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Edit VIDEO with every method from the same inputs and compare their speed and fidelity with full."""
    # Every input check before the seconds-long import of torch and diffusers (--config's file needs torch).
    check_prompt(prompt)
    names = _method_names(methods)
    guidance = _guidance(model, guidance)
    check_guidance(guidance, guidance_2)
    cache = cache_settings(cache_device, cache_dtype)
    options = with_config_file(config_file(config, names), method_options(method_option), cache)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    prepared = prepare_for_model(model, video, mask, box, frames, height, width)
    from hetcache.bench import bench_main

    bench_main(
        prepared,
        prompt=prompt,
        negative_prompt=negative_prompt,
        methods=methods,
        model=model,
        steps=steps,
        seed=seed,
        guidance=guidance,
        device=device,
        dtype=dtype,
        out=out,
        lpips_weights=lpips_weights,
        method_options=options,
        compile=compile,
        sources={"input video": video, "mask": mask},
        guidance_2=guidance_2,
        cache=cache,
    )


@app.command()
def plan(
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = 50,
    methods: MethodsOpt = BENCH_METHODS,
    delta: Annotated[
        float | None, typer.Option(help="Threshold of the HetCache presets (instead of planning from their budgets).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="FLOPs budget of the HetCache presets, a fraction of dense in (0, 1].")
    ] = None,
    frames: Annotated[
        int | None, typer.Option(help="Frames (4k+1); default the model's clip (81, 17 for the proxy), or the mask's.")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Height (multiple of 16); default 480 (256 for the proxy), or the mask's.")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Width (multiple of 16); default 832 (256 for the proxy), or the mask's.")
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="Mask video, folder or image; default a centred box of a quarter of the frame.")
    ] = None,
    cache_dtype: CacheDtypeOpt = None,
) -> None:
    """Print each method's step plan and analytic cost, where a two-expert pipeline switches experts, and the
    cache size of the HetCache methods, without running the denoiser."""
    from hetcache.bench import plan_main

    plan_main(
        model=model,
        steps=steps,
        methods=methods,
        delta=delta,
        budget=budget,
        frames=frames,
        height=height,
        width=width,
        mask=mask,
        cache_dtype=check_cache_dtype(cache_dtype),
    )


@app.command()
def sweep(
    source: Annotated[
        Path, typer.Argument(help="A video (with --mask or --box and --prompt) or a dataset folder (see --layout).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for results.json/.csv/.md, pareto.png and runs/ (resumable).")],
    mask: MaskOpt = None,
    box: BoxOpt = None,
    prompt: DatasetPromptOpt = None,
    layout: LayoutOpt = "folder",
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods to sweep (full runs once per clip as the reference).")
    ] = SWEEP_METHODS,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", help="NAME.KEY=V1,V2,...: the values of a config field to sweep for a method, "
                     "replacing its default grid (repeatable; several keys of one method are crossed)."),
    ] = None,
    method_option: MethodOptionOpt = None,
    negative_prompt: NegativeOpt = "",
    model: ModelOpt = DEFAULT_MODEL,
    steps: ModelStepsOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    compile: CompileOpt = False,
    lpips_weights: Annotated[
        Path | None, typer.Option(help="LPIPS weights (a state dict file); without it LPIPS is not computed.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Sweep only the first N items of a dataset.")] = None,
    guidance_2: Guidance2Opt = None,
    cache_device: CacheDeviceOpt = None,
    cache_dtype: CacheDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run each method over a grid of its own knob on one clip or a dataset, and plot PSNR in the mask against
    FLOPs share and speedup (one curve per method, mean over clips)."""
    names = [] if methods.strip() == "all" else _method_names(methods)
    grids = parse_grids(grid or [], METHOD_NAMES)
    guidance = _guidance(model, guidance)
    check_guidance(guidance, guidance_2)
    cache = cache_settings(cache_device, cache_dtype)
    options = method_options(method_option)
    fields = config_file(config, names or SWEEP_METHODS.split(","))
    if prompt is not None:
        check_prompt(prompt)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    from hetcache.sweep import sweep_main

    sweep_main(source, mask, box, prompt, out=out, methods=methods, grids=grids, method_options=options, model=model,
               layout=layout, steps=default_steps(model) if steps is None else steps, frames=frames, height=height,
               width=width, seed=seed, guidance=guidance, negative_prompt=negative_prompt, device=device,
               dtype=dtype, compile=compile, lpips_weights=lpips_weights, limit=limit, guidance_2=guidance_2,
               cache=cache, config_files={CONFIG_METHOD: fields} if fields else None)


@app.command()
def calibrate(
    source: Annotated[
        Path | None,
        typer.Argument(help="A video (with --mask or --box and --prompt) or a dataset folder (see --layout); "
                       "default: the demo's generated clip and ../shared/data/driving.mp4 when it is there."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for front.json/.csv/.md/.png, chosen.json and search/ "
                                      "(resumable).")] = Path("calibration"),
    target: Annotated[str, typer.Option(help="What to choose for: flops=SHARE (best fidelity within it), "
                                        "speedup=TIMES or psnr=DB (fewest FLOPs above it).")] = "flops=0.3",
    search: Annotated[str, typer.Option(help="How many configurations: quick, standard or wide.")] = "standard",
    mask: MaskOpt = None,
    box: BoxOpt = None,
    prompt: DatasetPromptOpt = None,
    layout: LayoutOpt = "folder",
    negative_prompt: NegativeOpt = "",
    model: ModelOpt = DEFAULT_MODEL,
    steps: ModelStepsOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    limit: Annotated[int | None, typer.Option(help="Use only the first N items of a dataset.")] = None,
) -> None:
    """Find the HetCache configuration that suits your model: run full once per clip, search plans (solver steps,
    plan family, forecast, PARTIAL share), write the Pareto front and the configuration chosen for --target."""
    from hetcache.calibrate import Target, calibrate_main, search_points

    Target.parse(target)
    search_points(search)
    if prompt is not None:
        check_prompt(prompt)
    calibrate_main(source, mask, box, prompt, out=out, target=target, model=model, search=search, layout=layout,
                   steps=default_steps(model) if steps is None else steps, frames=frames, height=height, width=width,
                   seed=seed, guidance=_guidance(model, guidance), negative_prompt=negative_prompt, device=device,
                   dtype=dtype, limit=limit)


@app.command("eval")
def evaluate(
    dataset: Annotated[Path, typer.Option(help="Dataset folder (docs/EVAL.md describes each layout).")],
    out: Annotated[Path, typer.Option(help="Folder for per-item and aggregate tables; finished items are skipped.")],
    layout: Annotated[str, typer.Option(help="vace-benchmark, vpbench or folder.")] = "folder",
    methods: MethodsOpt = BENCH_METHODS,
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = 50,
    frames: Annotated[
        int | None, typer.Option(help="Frames per item (4k+1); default as many as fit, up to 81.")
    ] = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    lpips_weights: Annotated[
        Path | None, typer.Option(help="LPIPS weights (a state dict file); without it LPIPS is skipped.")
    ] = None,
    i3d_weights: Annotated[
        Path | None, typer.Option(help="I3D weights (a state dict file) for VFID and KID; without it they are skipped.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items.")] = None,
    method_option: MethodOptionOpt = None,
    guidance_2: Guidance2Opt = None,
    cache_device: CacheDeviceOpt = None,
    cache_dtype: CacheDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run methods over a dataset of (video, mask, prompt) items and tabulate quality against references."""
    guidance = _guidance(model, guidance)
    check_guidance(guidance, guidance_2)
    cache = cache_settings(cache_device, cache_dtype)
    options = with_config_file(config_file(config, _method_names(methods)), method_options(method_option), cache)
    from hetcache.evaluate import eval_main

    eval_main(dataset=dataset, layout=layout, methods=methods, model=model, steps=steps, out=out, frames=frames,
              height=height, width=width, seed=seed, guidance=guidance, device=device, dtype=dtype,
              lpips_weights=lpips_weights, i3d_weights=i3d_weights, limit=limit, method_options=options,
              guidance_2=guidance_2, cache=cache)


@app.command()
def analyze(
    video: VideoArg,
    prompt: PromptOpt,
    out: Annotated[Path, typer.Option(help="Folder for analysis.json, analysis.png and mass_by_class.png.")],
    mask: MaskOpt = None,
    box: BoxOpt = None,
    negative_prompt: NegativeOpt = "",
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = 50,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    seed: SeedOpt = 0,
    guidance: ModelGuidanceOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    preset: Annotated[str, typer.Option(help="HetCache preset whose plan is drawn.")] = "hetcache-slow",
    delta: Annotated[float | None, typer.Option(help="Threshold instead of the preset's budget.")] = None,
    budget: Annotated[float | None, typer.Option(help="FLOPs budget instead of the preset's.")] = None,
    guidance_2: Guidance2Opt = None,
) -> None:
    """Per-step plan signal, last-block attention maps and attention mass per token class, as JSON and figures."""
    check_prompt(prompt)
    guidance = _guidance(model, guidance)
    check_guidance(guidance, guidance_2)
    from hetcache.analysis import analyze_main

    analyze_main(video=video, mask=mask, box=box, prompt=prompt, model=model, steps=steps, frames=frames,
                 height=height, width=width, seed=seed, guidance=guidance, device=device, dtype=dtype, out=out,
                 preset=preset, delta=delta, budget=budget, negative_prompt=negative_prompt, guidance_2=guidance_2)


def main() -> None:
    """Console-script entry point (`hetcache`). UserErrors end as one line and exit code 2 (see `_Group`). Under
    torchrun the command is one of several processes (`launch.processes`)."""
    with launch.processes(sys.argv[1:]):
        app(prog_name="hetcache")
