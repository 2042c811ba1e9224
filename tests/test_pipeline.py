"""The tiny offline pipeline, loading (folder, hub id, errors), device/dtype parsing and `run_edit`."""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanVACEPipeline

from hetcache import pipeline
from hetcache.errors import UserError
from hetcache.pipeline import (
    TINY_RANDOM,
    build_tiny_random_pipeline,
    default_flow_shift,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    run_edit,
)

FRAMES, HEIGHT, WIDTH = 5, 32, 48
STEPS = 2


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    video = np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((FRAMES, HEIGHT, WIDTH), dtype=bool)
    mask[:, 8:24, 16:40] = True
    return video, mask


def edit(pipe, inputs, **kw):
    video, mask = inputs
    return run_edit(pipe, video, mask, "an empty road", steps=STEPS, **kw)


def test_output_is_uint8_frames_of_the_input_size(tiny_pipe, inputs):
    result = edit(tiny_pipe, inputs)
    assert result.frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert result.frames.dtype == np.uint8
    assert (result.steps, result.num_frames, result.height, result.width) == (STEPS, FRAMES, HEIGHT, WIDTH)


def test_same_seed_is_identical_and_another_seed_differs(tiny_pipe, inputs):
    first = edit(tiny_pipe, inputs, seed=3).frames
    again = edit(tiny_pipe, inputs, seed=3).frames
    other = edit(tiny_pipe, inputs, seed=4).frames
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_timings_progress_and_pipeline_left_unchanged(tiny_pipe, inputs):
    calls = []
    result = edit(tiny_pipe, inputs, progress=lambda done, total: calls.append((done, total)))
    assert set(result.timings) == {"encode", "denoise", "decode", "total"}
    assert all(value >= 0 for value in result.timings.values())
    assert calls == [(step, STEPS) for step in range(1, STEPS + 1)]
    assert not tiny_pipe.transformer._forward_pre_hooks
    assert not hasattr(tiny_pipe, "_progress_bar_config")


@pytest.mark.parametrize("setting", [{"desc": "mine"}, {"desc": "mine", "disable": False}])
def test_progress_bar_setting_is_restored(inputs, setting):
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(**setting)
    during, stock = [], pipe.progress_bar

    def spy(**kwargs):
        during.append(dict(pipe._progress_bar_config))
        return stock(**kwargs)

    pipe.progress_bar = spy
    edit(pipe, inputs)
    assert during == [{**setting, "disable": True}]  # hidden during the call, whatever the user had set
    assert pipe._progress_bar_config == setting


def test_tiny_builder_is_deterministic_and_keeps_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_random_pipeline(seed=0).transformer.state_dict()
    b = build_tiny_random_pipeline(seed=0).transformer.state_dict()
    c = build_tiny_random_pipeline(seed=1).transformer.state_dict()
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_saved_folder_reloads_through_the_real_path_with_the_same_output(tiny_pipe, inputs, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"), "cpu", "fp32", height=HEIGHT, width=WIDTH)
    assert isinstance(loaded, WanVACEPipeline)
    assert isinstance(loaded.scheduler, UniPCMultistepScheduler)
    assert loaded.scheduler.config.flow_shift == default_flow_shift(HEIGHT, WIDTH)
    assert loaded.vae.dtype == torch.float32
    np.testing.assert_array_equal(edit(loaded, inputs, seed=5).frames, edit(tiny_pipe, inputs, seed=5).frames)


def test_tiny_random_in_bfloat16_matches_a_bfloat16_folder_load(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    from_folder = load_pipeline(str(tmp_path / "tiny"), "cpu", "bf16")
    built = load_pipeline(TINY_RANDOM, "cpu", "bf16")
    assert built.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert built.transformer.scale_shift_table.dtype == torch.float32
    assert built.vae.dtype == torch.float32
    for name in ("transformer", "text_encoder", "vae"):
        expected = getattr(from_folder, name).state_dict()
        actual = getattr(built, name).state_dict()
        assert expected.keys() == actual.keys()
        for key, tensor in expected.items():
            assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), f"{name}.{key}"


@pytest.mark.parametrize("model", ["no-such-model", "./missing/folder/x", "a/b/c"])
def test_unknown_model_names_the_choices(model):
    with pytest.raises(UserError, match="unknown model .*tiny-random"):
        load_pipeline(model, "cpu")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a diffusers WanVACE pipeline folder"):
        load_pipeline(str(tmp_path), "cpu")


def test_folder_of_another_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="holds a StableDiffusionPipeline"):
        load_pipeline(str(tmp_path), "cpu")


def test_incomplete_pipeline_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanVACEPipeline"}))
    with pytest.raises(UserError, match="could not load the pipeline"):
        load_pipeline(str(tmp_path), "cpu")


def test_uncached_hub_id_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(pipeline.hub_constants, "HF_HUB_OFFLINE", True)
    expected = "no-such-model' was not found locally and the hub is unreachable: .*hf download"
    with pytest.raises(UserError, match=expected):
        load_pipeline("hetcache-tests/no-such-model", "cpu")


def test_uncached_hub_id_fails_with_a_user_error():
    with pytest.raises(UserError, match="hetcache-tests/no-such-model"):
        load_pipeline("hetcache-tests/no-such-model", "cpu")


def test_hub_probe_tells_an_answer_from_no_connection(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    monkeypatch.setattr(pipeline.hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("no_proxy", "*")
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    assert pipeline._hub_reachable()
    thread.join()
    server.server_close()
    assert not pipeline._hub_reachable()


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("FP32", "cuda") == torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")


@pytest.mark.parametrize(
    ("height", "width", "shift"),
    [(480, 832, 3.0), (832, 480, 3.0), (544, 960, 3.0), (128, 224, 3.0), (624, 1104, 5.0), (720, 1280, 5.0)],
)
def test_default_flow_shift(height, width, shift):
    assert default_flow_shift(height, width) == shift


def test_load_sets_the_flow_shift_for_the_size():
    assert load_pipeline(TINY_RANDOM, "cpu", height=720, width=1280).scheduler.config.flow_shift == 5.0


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_blank_prompt_is_refused(tiny_pipe, inputs, prompt):
    with pytest.raises(UserError, match="prompt is empty"):
        run_edit(tiny_pipe, *inputs, prompt, steps=STEPS)


@pytest.mark.parametrize(
    ("frames", "height", "width", "message"),
    [(4, 32, 48, "4k\\+1"), (5, 40, 48, "multiples of 16"), (5, 32, 24, "multiples of 16")],
)
def test_sizes_that_do_not_fit_are_refused(tiny_pipe, frames, height, width, message):
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=message):
        run_edit(tiny_pipe, video, np.ones(video.shape[:3], dtype=bool), "a road", steps=STEPS)


def test_mask_of_another_shape_is_refused(tiny_pipe, inputs):
    video, mask = inputs
    with pytest.raises(UserError, match="mask must be bool"):
        run_edit(tiny_pipe, video, mask[:1], "a road", steps=STEPS)


def test_hidden_masked_pixels_never_reach_the_model(tiny_pipe, inputs):
    video, mask = inputs
    changed = np.where(mask[..., None], 255 - video, video)
    hidden = edit(tiny_pipe, inputs).frames
    np.testing.assert_array_equal(hidden, edit(tiny_pipe, (changed, mask)).frames)
    shown = edit(tiny_pipe, inputs, hide_masked=False).frames
    assert not np.array_equal(shown, edit(tiny_pipe, (changed, mask), hide_masked=False).frames)


def test_the_proxy_has_its_own_defaults_and_other_models_wans():
    from hetcache.pipeline import PROXY, default_guidance, default_steps, native_limits

    assert (default_steps(PROXY), default_guidance(PROXY), native_limits(PROXY)) == (20, 1.0, (256 * 256, 17))
    assert (default_steps(TINY_RANDOM), default_guidance(TINY_RANDOM), native_limits(TINY_RANDOM)) == (
        50, 5.0, (480 * 832, 81))


def test_a_folder_whose_config_has_a_wrong_type_is_a_user_error(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    config = tmp_path / "tiny" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": "three"}))
    with pytest.raises(UserError, match=r"could not load the pipeline in .*TypeError: .*check the values in its"):
        load_pipeline(str(tmp_path / "tiny"), "cpu")


@pytest.mark.parametrize("guidance", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_guidance_is_refused_before_anything_runs(tiny_pipe, inputs, guidance, monkeypatch):
    monkeypatch.setattr(type(tiny_pipe), "__call__", lambda *a, **k: pytest.fail("the pipeline ran"))
    with pytest.raises(UserError, match="is not a finite number"):
        edit(tiny_pipe, inputs, guidance=guidance)


def test_a_model_that_overflows_stops_with_a_user_error_at_the_first_bad_step(inputs):
    pipe = build_tiny_random_pipeline()
    with torch.no_grad():
        pipe.transformer.proj_out.bias.fill_(float("inf"))  # every prediction inf: the latents become NaN
    steps = []
    with pytest.raises(UserError, match=r"^the latents after step 1 of 2 hold NaN or inf .* use bf16 or fp32"):
        edit(pipe, inputs, progress=lambda done, total: steps.append(done))
    assert steps == []  # stopped at the first step's end, before the progress callback


def test_decoded_frames_that_are_not_finite_are_refused(tiny_pipe, inputs, monkeypatch):
    decode = tiny_pipe.vae.decode

    def overflowing(*args, **kwargs):
        out = decode(*args, **kwargs)  # (frames,) with return_dict=False
        out[0][:, :, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(tiny_pipe.vae, "decode", overflowing)
    with pytest.raises(UserError, match="^the decoded frames hold NaN or inf values"):
        edit(tiny_pipe, inputs)


def test_guidance_2_needs_two_experts(tiny_pipe, inputs):
    with pytest.raises(UserError, match="--guidance-2 is the second expert's guidance"):
        edit(tiny_pipe, inputs, guidance_2=3.0)


def test_size_limits_are_the_models():
    assert pipeline.largest_area("proxy") == 512 * 512 and pipeline.largest_area("tiny-random") == 1920 * 1088
    assert pipeline.native_size("proxy") == (17, 256, 256) and pipeline.native_size("x/y") == (81, 480, 832)
