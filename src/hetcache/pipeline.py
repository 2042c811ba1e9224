"""Load a Wan2.1-VACE pipeline (hub id, local folder or a tiny offline model) and run one masked edit.

The edit goes through the stock `WanVACEPipeline.__call__`; the stage timings come from a forward pre-hook on the
transformer and from `callback_on_step_end`, so no pipeline code is copied and diffusers upgrades keep working.

torch, diffusers and transformers are imported inside the functions that use them: the CLI imports this module
for its constants and input checks, and `hetcache --help` or a bad argument must not wait seconds for them.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from huggingface_hub import constants as hub_constants
from PIL import Image

from hetcache import compat, launch
from hetcache import video as vio
from hetcache.errors import UserError

if TYPE_CHECKING:
    import torch
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline
    from transformers import T5Tokenizer

TINY_RANDOM = "tiny-random"
TINY_RANDOM_MOE = "tiny-random-moe"  # two experts, as Wan2.2's VACE-Fun A14B
TINY_BOUNDARY_RATIO = 0.875  # the switch Wan2.2-T2V-A14B ships: steps at t >= 875 run on the first expert
PROXY = "proxy"
DEFAULT_MODEL = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
# The uint8 value that hides the masked region from the model (mid-grey, 0 after the pipeline's scaling).
HIDDEN_GREY = 128

# Longest prompt the real UMT5 text encoder of Wan2.1 is used with.
MAX_SEQUENCE_LENGTH = 512
# The longest clip the rotary table of Wan's transformers (1024 latent frames) covers: 4 x 1023 + 1 frames.
MAX_FRAMES_ROPE = 4 * 1023 + 1

# The tiny tokenizer's word list: enough for prompts such as "an empty road", while single letters keep any
# other lowercase text tokenisable (anything else becomes <unk>).
_TINY_WORDS = (
    "a an the of and in on with to is at by from empty road street car cars person people tree trees sky "
    "building house water grass field city night day snow rain blue red green white black moving background"
).split()
_TINY_TEXT_LENGTH = 16

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_PROBE_TIMEOUT_S = 10.0

# Accepted dtype names -> the torch attribute they name.
_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def tiny_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer built from an in-code vocabulary (no file, no download)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + word, -2.0) for word in _TINY_WORDS]
    vocab += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=_TINY_TEXT_LENGTH)


def tiny_text_encoder(vocab_size: int) -> torch.nn.Module:
    """A 2-layer UMT5 encoder of width 32 (random weights from the global RNG): the text side of the tiny models."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def build_tiny_random_pipeline(
    seed: int = 0, *, num_layers: int = 3, vace_layers: tuple[int, ...] = (0, 2), two_experts: bool = False
) -> WanVACEPipeline:
    """A WanVACEPipeline with tiny random weights, built offline in float32 on the CPU.

    Its output is noise-like: it checks the plumbing (shapes, masks, scheduler, I/O, hooks), not the quality.
    The same seed gives the same weights; the global RNG is left untouched. The rope table is as long as the
    real model's, so 480x832 at 81 frames still fits. `two_experts` adds a second transformer (other weights)
    for the low-noise steps, switched at TINY_BOUNDARY_RATIO, as Wan2.2's two-expert VACE pipelines do.
    """
    import torch
    from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

    def transformer() -> WanVACETransformer3DModel:
        return WanVACETransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, vace_layers=list(vace_layers), vace_in_channels=96,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer))
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        experts = [transformer() for _ in range(2 if two_experts else 1)]
    pipe = WanVACEPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=flow_scheduler(3.0), transformer=experts[0],
        transformer_2=experts[1] if two_experts else None, boundary_ratio=TINY_BOUNDARY_RATIO if two_experts else None,
    )
    for module in (text_encoder, vae, *experts):
        module.eval()
    return pipe


def flow_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """The scheduler of the Wan2.1 recipe: UniPC over flow-matching sigmas with `flow_shift`."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def preview_timesteps(scheduler: Any, steps: int) -> torch.Tensor:
    """The timesteps `scheduler` (None: `flow_scheduler(3.0)`) runs for `steps` steps, from a copy of it, so a
    plan can be previewed without touching the pipeline's own scheduler."""
    source = scheduler if scheduler is not None else flow_scheduler(3.0)
    preview = type(source).from_config(source.config)
    preview.set_timesteps(steps)
    return preview.timesteps


def default_flow_shift(height: int, width: int) -> float:
    """The UniPC flow shift of the official Wan2.1 recipe: 3.0 for the 480p class, 5.0 for 720p and above.

    The recipe names only 480x832 and 720x1280; other sizes go to the class nearer by pixel area, so the cut-off
    is the midpoint of the two areas, 660,480 pixels (e.g. 544x960 is 480p, 624x1104 and 720x1280 are 720p).
    """
    cutoff = (480 * 832 + 720 * 1280) / 2
    return 5.0 if height * width >= cutoff else 3.0


def resolve_device(device: str | None) -> torch.device:
    """Parse a device name; "auto" (or None) picks CUDA when available, else the CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available: use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available: use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device | str) -> torch.dtype:
    """Parse a dtype name; "auto" (or None) is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return getattr(torch, _DTYPES[dtype.lower()])
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}") from None


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    *,
    height: int = 480,
    width: int = 832,
) -> WanVACEPipeline:
    """Load a WanVACEPipeline from `tiny-random`, `proxy`, a local folder (from save_pretrained) or a hub id.

    The VAE stays in float32 (the official recipe); the text encoder and transformer use `dtype`. The scheduler
    is UniPC with the flow shift for the output size (`default_flow_shift`). A hub id is looked up in the local
    cache first, then with a single short online attempt, so an offline machine fails fast instead of retrying.
    """
    import torch
    from diffusers import UniPCMultistepScheduler

    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)

    if model in (TINY_RANDOM, TINY_RANDOM_MOE):
        pipe = build_tiny_random_pipeline(two_experts=model == TINY_RANDOM_MOE)
        if torch_dtype != torch.float32:
            pipe.text_encoder.to(torch_dtype)
            for expert in (pipe.transformer, pipe.transformer_2):
                if expert is not None:
                    _cast_keeping_fp32_modules(expert, torch_dtype)
    elif model == PROXY:
        folder = proxy_folder()
        if not (folder / "model_index.json").is_file():
            raise UserError(f"the proxy model's weights are missing from {folder}: reinstall hetcache")
        pipe = _load_folder(folder, torch_dtype)
    else:
        folder = Path(model).expanduser()
        if folder.exists():
            _check_pipeline_folder(folder)
            pipe = _load_folder(folder, torch_dtype)
        elif is_hub_id(model):
            pipe = _load_from_hub(model, torch_dtype)
        else:
            raise UserError(
                f"unknown model {model!r}: pass {PROXY}, {TINY_RANDOM}, {TINY_RANDOM_MOE}, a local pipeline folder, "
                f"or a hub id such as {DEFAULT_MODEL}"
            )
    pipe.scheduler = UniPCMultistepScheduler.from_config(
        pipe.scheduler.config, flow_shift=default_flow_shift(height, width)
    )
    return launch.parallelize(pipe.to(torch_device))  # under torchrun: the transformer's tokens split over ranks


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub repository id ("owner/name")."""
    return _HUB_ID.match(name) is not None


def proxy_folder() -> Path:
    """Where the trained proxy pipeline ships inside the package (see hetcache.proxy)."""
    return Path(__file__).parent / "data" / "proxy"


def native_limits(model: str) -> tuple[int, int]:
    """(pixel area, most frames) a model is made for: the proxy's 256x256 x 17, Wan's 480x832 x 81 otherwise."""
    if model == PROXY:
        return 256 * 256, 17
    return vio.DEFAULT_AREA, vio.MAX_FRAMES


def native_size(model: str) -> tuple[int, int, int]:
    """(frames, height, width) of a model's native clip: the proxy's 17 x 256x256, Wan's 81 x 480x832."""
    return (17, 256, 256) if model == PROXY else (vio.MAX_FRAMES, 480, 832)


def largest_area(model: str) -> int:
    """The most pixels per frame a model is run at: 4x the proxy's 256x256 area; the 1080p class (1920x1088) for
    Wan, whose recipes stop at 720p. Larger sizes are refused before any frame is resized (a 16000-pixel side
    would allocate gigabytes for nothing)."""
    return 4 * 256 * 256 if model == PROXY else 1920 * 1088


def prepare_for_model(
    model: str,
    video: str | Path,
    mask: str | Path | None,
    box: str | None,
    frames: int | None,
    height: int | None,
    width: int | None,
    stride: int = 1,
) -> vio.PreparedInputs:
    """Read and fit the video and mask within the model's native size and length (`native_limits`); the notes
    on what was adjusted go to stderr. Needs neither torch nor diffusers, so commands run it before loading.
    Under torchrun (`hetcache.launch`) rank 0 reads them and sends them to the other processes."""

    def read() -> vio.PreparedInputs:
        area, max_frames = native_limits(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the same facts come back as notes
            prepared = vio.prepare_inputs(
                video, mask, box=box, height=height, width=width, frames=frames, stride=stride, area=area,
                max_frames=max_frames, max_area=largest_area(model),
            )
        for note in prepared.notes:
            print(f"note: {note}", file=sys.stderr)
        return prepared

    return launch.from_main(read)


def default_steps(model: str) -> int:
    """Denoising steps by default: the 20 the proxy was measured with (docs/PROXY.md), Wan's recipe of 50 otherwise."""
    return 20 if model == PROXY else 50


def default_guidance(model: str) -> float:
    """The proxy learns no language, so guidance would only double its work: 1 (off); Wan's recipe uses 5."""
    return 1.0 if model == PROXY else 5.0


def _cast_keeping_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast as `from_pretrained(dtype=...)` does: the model's `_keep_in_fp32_modules` stay in float32, untouched."""
    keep = set(compat.keep_in_fp32_modules(model))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)


def _check_pipeline_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    what = f"{str(folder)!r} is not a diffusers WanVACE pipeline folder"
    if not index.is_file():
        raise UserError(f"{what} (no model_index.json): pass a folder written by save_pretrained or a hub id")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{what} (unreadable model_index.json): pass a folder written by save_pretrained") from None
    if class_name != "WanVACEPipeline":
        raise UserError(f"{what} (it holds a {class_name}): pass a WanVACEPipeline folder")


def _load_pretrained(source: str, dtype: torch.dtype, **kwargs) -> WanVACEPipeline:
    """The one loading path for folders and hub ids: VAE in float32, the rest in `dtype` (`dtype=` is the
    spelling diffusers 0.42 prefers over the deprecated `torch_dtype=`)."""
    import torch
    from diffusers import AutoencoderKLWan, WanVACEPipeline

    with warnings.catch_warnings():
        # diffusers 0.42 still passes an argument that huggingface_hub 1.x+ ignores; the warning means nothing here.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", dtype=torch.float32, **kwargs)
        return WanVACEPipeline.from_pretrained(source, vae=vae, dtype=dtype, **kwargs)


def _load_folder(folder: Path, dtype: torch.dtype) -> WanVACEPipeline:
    try:
        return _load_pretrained(str(folder), dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the pipeline in {str(folder)!r}: {_first_line(error)}") from None
    except (TypeError, KeyError) as error:  # a config value of the wrong type or a missing key
        raise UserError(
            f"could not load the pipeline in {str(folder)!r}: {type(error).__name__}: {_first_line(error)}: "
            "check the values in its config.json files"
        ) from None


def _load_from_hub(model: str, dtype: torch.dtype) -> WanVACEPipeline:
    return _from_hub(model, lambda **kwargs: _load_pretrained(model, dtype, **kwargs))


def _from_hub(model: str, load: Callable[..., Any]) -> Any:
    """`load(**kwargs)` from the local cache (local_files_only=True), else with one online attempt after a quick
    reachability check, so an offline machine gets its answer in seconds instead of after retries."""
    try:
        return load(local_files_only=True)
    except (OSError, ValueError):
        pass  # not (fully) cached: try the hub once below
    unreachable = (
        f"model {model!r} was not found locally and the hub is unreachable: pass a local folder with --model PATH "
        f"(download it on a machine with internet: hf download {model} --local-dir DIR)"
    )
    if hub_constants.HF_HUB_OFFLINE or not _hub_reachable():
        raise UserError(unreachable)
    try:
        return load()
    except (OSError, ValueError) as error:
        raise UserError(f"could not load model {model!r} from the hub: {_first_line(error)}") from None


def load_for_planning(model: str, height: int, width: int) -> tuple[WanVACEPipeline, int]:
    """What a plan preview needs and nothing more, with the text length the prompt embeddings will have: a
    WanVACEPipeline holding the transformer (and a two-expert pipeline's `transformer_2` and switch), in bfloat16
    on the CPU, with the scheduler for the size. The tiny models are built in code whole; folders, `proxy` and hub
    ids load only their transformers (a hub id from the cache, or after the same quick reachability check as
    `load_pipeline`)."""
    import torch
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    if model in (TINY_RANDOM, TINY_RANDOM_MOE):
        pipe = build_tiny_random_pipeline(two_experts=model == TINY_RANDOM_MOE)
        pipe.scheduler = flow_scheduler(default_flow_shift(height, width))
        return pipe, _max_sequence_length(pipe)
    folder = proxy_folder() if model == PROXY else Path(model).expanduser()
    if folder.exists():
        _check_pipeline_folder(folder)
        source = str(folder)
    elif is_hub_id(model):
        source = model
    else:
        raise UserError(f"unknown model {model!r}: pass {PROXY}, {TINY_RANDOM}, {TINY_RANDOM_MOE}, a local pipeline "
                        f"folder, or a hub id such as {DEFAULT_MODEL}")

    def load(**kwargs: Any) -> tuple[list[Any], float | None]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            index = WanVACEPipeline.load_config(source, **kwargs)
            names = ["transformer"] + (["transformer_2"] if (index.get("transformer_2") or [None])[0] else [])
            experts = [WanVACETransformer3DModel.from_pretrained(source, subfolder=name, dtype=torch.bfloat16,
                                                                 **kwargs) for name in names]
        return experts, index.get("boundary_ratio")

    try:
        experts, ratio = load() if folder.exists() else _from_hub(model, load)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"could not load the transformer of {model!r}: {_first_line(error)}: pass a local pipeline "
                        "folder") from None
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=experts[0],
                           scheduler=flow_scheduler(default_flow_shift(height, width)),
                           transformer_2=experts[1] if len(experts) > 1 else None,
                           boundary_ratio=ratio if len(experts) > 1 else None)
    return pipe, _tokenizer_length(folder) if folder.exists() else MAX_SEQUENCE_LENGTH


def _tokenizer_length(folder: Path) -> int:
    """The text length a pipeline folder's tokenizer gives the prompt embeddings (512 for Wan's UMT5)."""
    try:
        config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
        return min(MAX_SEQUENCE_LENGTH, int(config["model_max_length"]))
    except (OSError, ValueError, KeyError, TypeError):
        return MAX_SEQUENCE_LENGTH


def _hub_reachable() -> bool:
    """One quick request to the hub endpoint (honours HF_ENDPOINT and proxy variables), with no retries.

    Any HTTP answer means the hub is reachable; only a failed connection or a timeout means it is not. This keeps
    an offline machine from sitting through huggingface_hub's retry back-off.
    """
    try:
        request = urllib.request.Request(hub_constants.ENDPOINT, method="HEAD")
        with urllib.request.urlopen(request, timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class EditResult:
    """The raw model output of one edit (no compositing) and where its time went.

    `timings` (seconds): "encode" (text and VAE encoding, up to the first denoiser call), "denoise" (first
    denoiser call to the end of the last step), "decode" (VAE decode and postprocessing) and "total"; callers
    add "load".
    """

    frames: np.ndarray
    timings: dict[str, float]
    steps: int
    height: int
    width: int
    num_frames: int


def run_edit(
    pipe: WanVACEPipeline,
    video: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    *,
    negative_prompt: str = "",
    steps: int = 50,
    guidance: float = 5.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    latents: torch.Tensor | None = None,
    hide_masked: bool = True,
    guidance_2: float | None = None,
) -> EditResult:
    """Regenerate the masked region of `video` (uint8 [F,H,W,3]) where `mask` (bool [F,H,W]) is True.

    With `hide_masked` the masked pixels are set to mid-grey first, so the model never sees what it replaces
    (removal and inpainting; `WanVACEPipeline` would otherwise pass them on as its "reactive" input). Turn it off
    for edits that should start from the original content.

    `guidance_2` is the guidance of a two-expert pipeline's second expert (`guidance_scale_2`; None: the same as
    `guidance`). Classifier-free guidance runs when `guidance` > 1.

    Sizes are taken from the arrays and must already fit the model (see `fit_error`). `progress(done, total)`
    is called after every denoising step; the pipeline's own progress bar is hidden during the call. The
    pipeline is left as it was (hooks removed, progress bar setting restored). Latents or frames that are not
    finite (an fp16 overflow) end the edit with a UserError instead of a black video.
    """
    import torch

    check_prompt(prompt)
    check_guidance(guidance, guidance_2)
    if guidance_2 is not None and not is_two_expert(pipe):
        raise UserError("--guidance-2 is the second expert's guidance of a two-expert pipeline (Wan2.2), and this "
                        "model has one transformer: drop it")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    problem = fit_error(pipe, video, mask)
    if problem:
        raise UserError(problem)
    num_frames, height, width = mask.shape

    device = compat.execution_device(pipe)
    generator = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    marks: dict[str, float] = {}

    def on_first_denoiser_call(module: torch.nn.Module, args: tuple) -> None:
        if "denoise_start" not in marks:
            sync()
            marks["denoise_start"] = time.perf_counter()

    def on_step_end(pipeline: WanVACEPipeline, step: int, timestep: torch.Tensor, tensors: dict) -> dict:
        sync()
        marks["denoise_end"] = time.perf_counter()
        if not bool(torch.isfinite(tensors["latents"]).all()):
            raise UserError(non_finite_message(f"the latents after step {step + 1} of {steps}"))
        if progress is not None:  # out of the solver steps that run (a HetCache plan may run fewer than asked)
            progress(step + 1, len(pipeline.scheduler.timesteps))
        return {}

    if hide_masked:
        video = np.where(mask[..., None], np.uint8(HIDDEN_GREY), video)
    frames_in = [Image.fromarray(frame) for frame in video]
    mask_rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    masks_in = [Image.fromarray(frame) for frame in mask_rgb]

    bar_config = compat.progress_bar_config(pipe)
    pipe.set_progress_bar_config(**{**(bar_config or {}), "disable": True})
    handles = [expert.register_forward_pre_hook(on_first_denoiser_call) for expert in experts(pipe)]
    extra = {} if guidance_2 is None else {"guidance_scale_2": guidance_2}
    try:
        sync()
        start = time.perf_counter()
        output = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            video=frames_in,
            mask=masks_in,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            latents=latents,
            output_type="np",
            callback_on_step_end=on_step_end,
            max_sequence_length=_max_sequence_length(pipe),
            **extra,
        ).frames[0]
        if not np.isfinite(output).all():
            raise UserError(non_finite_message("the decoded frames"))
        frames = (np.clip(output, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        end = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
        compat.restore_progress_bar_config(pipe, bar_config)

    timings = {
        "encode": marks["denoise_start"] - start,
        "denoise": marks["denoise_end"] - marks["denoise_start"],
        "decode": end - marks["denoise_end"],
        "total": end - start,
    }
    return EditResult(
        frames=frames, timings=timings, steps=steps, height=height, width=width, num_frames=num_frames
    )


def check_guidance(guidance: float, guidance_2: float | None = None) -> None:
    """Reject a guidance scale that is not a finite number (`inf` would only give NaN latents and a black video)."""
    for name, value in (("--guidance", guidance), ("--guidance-2", guidance_2)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{name} {value} is not a finite number: use e.g. 5 (<= 1 turns guidance off)")


def non_finite_message(what: str) -> str:
    """Why an edit stopped when the model produced NaN or inf values, and what to change."""
    return (f"{what} hold NaN or inf values, so the output would be black: the model overflowed (with --dtype fp16 "
            "use bf16 or fp32; lower --guidance)")


def experts(pipe: WanVACEPipeline) -> list[torch.nn.Module]:
    """The pipeline's transformers in the order they run: one, or two for Wan2.2's two-expert pipelines."""
    return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]


def is_two_expert(pipe: WanVACEPipeline) -> bool:
    """Whether the pipeline switches between two transformers (`transformer_2` and a `boundary_ratio`)."""
    return len(experts(pipe)) == 2 and pipe.config.get("boundary_ratio") is not None


def check_prompt(prompt: str) -> None:
    """Reject an empty or blank prompt (checked before a slow model load, and again by `run_edit`)."""
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty: describe what the masked region should show with --prompt")


def fit_error(pipe: WanVACEPipeline, video: np.ndarray, mask: np.ndarray) -> str | None:
    """Why `video` and `mask` cannot go into `pipe` unchanged, or None when they fit.

    Height and width must be multiples of the VAE stride times the patch size (16 for Wan), and the frame count
    must be 4k+1 (the causal VAE keeps frame 0 and folds the rest in groups of 4).
    """
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        return f"video must be uint8 [frames, height, width, 3], got {video.dtype} {list(video.shape)}"
    if mask.dtype != np.bool_ or mask.shape != video.shape[:3]:
        return f"mask must be bool {list(video.shape[:3])}, got {mask.dtype} {list(mask.shape)}"
    num_frames, height, width = mask.shape
    spatial = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    temporal = pipe.vae_scale_factor_temporal
    if height % spatial or width % spatial or height == 0 or width == 0:
        return f"size {width}x{height} does not fit the model: width and height must be positive multiples of {spatial}"
    if num_frames % temporal != 1:
        return f"{num_frames} frames do not fit the model: the frame count must be {temporal}k+1 (e.g. 9, 17, 81)"
    return None


def _max_sequence_length(pipe: WanVACEPipeline) -> int:
    """512 text tokens for the real encoder, fewer when the tokenizer declares a shorter limit (tiny models)."""
    return min(MAX_SEQUENCE_LENGTH, int(pipe.tokenizer.model_max_length))
