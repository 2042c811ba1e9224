"""The dataset evaluation on tiny synthetic datasets of every layout: files, table schemas, ground truth, resume,
aggregates as means of items, VFID from a stand-in I3D model, and the error paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hetcache import evaluate
from tiny_models import demo_clip
from hetcache.errors import UserError
from hetcache.evaluate import (
    AGGREGATE_COLUMNS,
    GREY,
    ITEM_COLUMNS,
    OUTPUT_FILES,
    aggregate,
    eval_main,
    load_item,
    scan_dataset,
)
from hetcache.metrics import kid, vfid
from hetcache.video import write_mask_video, write_video

FRAMES, SIZE, STEPS = 5, 32, 3
METHODS = "full,fewer-steps"
PROMPTS = ("an empty road", "a red car on the road", "a blue car")


pytestmark = pytest.mark.usefixtures("one_thread")


def clip(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A different 5-frame 32x32 clip and mask per index (the demo road scene at another moment)."""
    video, mask = demo_clip(frames=FRAMES + 2 * index, height=SIZE, width=SIZE)
    return video[-FRAMES:], mask[-FRAMES:]


def write_clip(path: Path, frames: np.ndarray) -> None:
    write_video(path, frames, 8.0, lossless=True)


def make_folder(root: Path) -> Path:
    """ROOT/<item>/video.mp4, mask.mp4, prompt.txt, ground_truth.mp4 (all three items are inpainting)."""
    for index, prompt in enumerate(PROMPTS):
        video, mask = clip(index)
        folder = root / f"clip{index}"
        write_clip(folder / "video.mp4", video)
        write_clip(folder / "ground_truth.mp4", video)
        write_mask_video(folder / "mask.mp4", mask, 8.0, lossless=True)
        (folder / "prompt.txt").write_text(prompt + "\n")
    return root


def make_vace(root: Path) -> Path:
    """Two flat data/<id>_* items with prompts in metadata.jsonl, one per-task folder with prompt.txt, and a
    depth item without a mask (left out)."""
    rows = []
    for index in range(2):
        video, mask = clip(index)
        stem = f"sample{index:06d}"
        write_clip(root / "data" / f"{stem}_src_video.mp4", np.where(mask[..., None], np.uint8(GREY), video))
        write_clip(root / "data" / f"{stem}_raw_video.mp4", video)
        write_mask_video(root / "data" / f"{stem}_src_mask.mp4", mask, 8.0, lossless=True)
        rows.append({"id": stem, "task": "inpainting", "prompt": PROMPTS[index]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    video, mask = clip(2)
    folder = root / "assets" / "examples" / "outpainting"
    write_clip(folder / "src_video.mp4", video)
    write_mask_video(folder / "src_mask.mp4", mask, 8.0, lossless=True)
    (folder / "prompt.txt").write_text(PROMPTS[2])
    write_clip(root / "assets" / "examples" / "depth" / "src_video.mp4", video)
    return root


def make_vpbench(root: Path, edit: bool = True) -> Path:
    """our_video_edit.csv (or our_video_inpaint.csv) over two pexels and one videovo clip with .npz id masks."""
    names = ("000000000855_854996_seg_0_9.mp4", "000000001114_855455_seg_5_14.mp4", "000005000000.0.mp4")
    prompt_column = "Edited_video_caption" if edit else "video_inpainting_prompt"
    rows = []
    for index, name in enumerate(names):
        video, mask = clip(index)
        base = name.split(".")[0]
        if name.endswith(".0.mp4"):
            video_path, source = root / "videovo" / "raw_video" / base[:-3] / name, "videovo"
        else:
            video_path, source = root / "pexels" / "pexels" / "raw_video" / base[:9] / name, "pexels"
        padded = np.concatenate([video[:1], video])  # the clip starts at source frame 1
        write_clip(video_path, padded)
        ids = np.zeros(padded.shape[:3], dtype=np.uint8)
        ids[1:][mask] = 3
        ids[:, :4, :4] = 1  # another object, not selected
        (root / "video_inpainting" / source / base).mkdir(parents=True)
        np.savez(root / "video_inpainting" / source / base / "all_masks.npz", ids)
        rows.append({"path": name, "mask_id": 3, "fps": 8, "start_frame": 1, "end_frame": 1 + FRAMES,
                     prompt_column: PROMPTS[index]})
    table = root / ("our_video_edit.csv" if edit else "our_video_inpaint.csv")
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


MAKERS = {"folder": make_folder, "vace-benchmark": make_vace, "vpbench": make_vpbench}


class ChannelMeans(torch.nn.Module):
    """A stand-in I3D: 2-d features (mean of the red and green channels over the clip)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2].mean(dim=(2, 3, 4))


def run(dataset: Path, layout: str, out: Path, **options) -> dict:
    arguments = dict(methods=METHODS, model="tiny-random", steps=STEPS, frames=FRAMES, height=SIZE, width=SIZE,
                     seed=0, guidance=5.0, device="cpu", dtype="fp32", lpips_weights=None, i3d_weights=None,
                     limit=None)
    arguments.update(options)
    return eval_main(dataset, layout, out=out, **arguments)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> Path:
    """An I3D weights path whose loading is replaced by the 2-d ChannelMeans stand-in: a real I3D's 1024-d features
    would need 1,025 clips per set for VFID (the real network's loading is tested in test_metrics)."""
    path = tmp_path_factory.mktemp("i3d") / "i3d.pt"
    path.write_bytes(b"stand-in")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.I3D, "from_file", classmethod(lambda cls, p, device="cpu", batch=4: cls(ChannelMeans())))
        yield path


@pytest.fixture(scope="module", params=list(MAKERS))
def evaluated(request, tmp_path_factory, i3d_file):
    layout = request.param
    base = tmp_path_factory.mktemp(layout.replace("-", "_"))
    dataset = MAKERS[layout](base / "dataset")
    out = base / "out"
    summary = run(dataset, layout, out, i3d_weights=i3d_file)
    return layout, dataset, out, summary


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def test_every_table_is_written_with_its_schema(evaluated):
    layout, _, out, summary = evaluated
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    header, rows = read_csv(out / "per_item.csv")
    assert header == list(ITEM_COLUMNS)
    assert len(rows) == 3 * 2 and {r["method"] for r in rows} == {"full", "fewer-steps"}
    header, rows = read_csv(out / "aggregate.csv")
    assert header == list(AGGREGATE_COLUMNS)
    per_item = json.loads((out / "per_item.json").read_text())
    assert per_item["schema"] == summary["schema"] == "hetcache-eval/1"
    assert per_item["failed"] == [] and len(per_item["items"]) == 3
    for item in per_item["items"]:
        assert set(item) == {"id", "task", "prompt", "frames", "height", "width", "ground_truth", "rows",
                             "skipped", "notes"}
        assert (item["frames"], item["height"], item["width"]) == (FRAMES, SIZE, SIZE)
        for row in item["rows"]:
            assert set(row) == set(ITEM_COLUMNS)
        assert (evaluate._item_dir(out, item["id"]) / "result.json").is_file()
    assert {r["method"] for r in summary["rows"] if r["group"] == "all"} == {"full", "fewer-steps"}
    for row in summary["rows"]:
        assert set(row) == set(AGGREGATE_COLUMNS)
    assert "\n| group | method | items |" in (out / "aggregate.md").read_text()
    assert "\n| item | task | method |" in (out / "per_item.md").read_text()
    assert json.loads((out / "aggregate.json").read_text()) == summary


def test_ground_truth_is_used_only_where_it_exists(evaluated):
    layout, _, out, _ = evaluated
    items = json.loads((out / "per_item.json").read_text())["items"]
    for item in items:
        truth = item["ground_truth"]
        assert truth == (layout == "folder" or item["task"] == "inpainting")
        for row in item["rows"]:
            assert (row["gt_psnr_mask"] is not None) == truth
            assert (row["gt_temporal_mask"] is not None) == truth
            if row["method"] == "full":
                assert row["identical_to_full"] and row["full_psnr_mask"] is None and row["speedup"] == 1.0
            else:
                assert row["steps"] == 2 and not row["identical_to_full"]
                assert row["full_psnr_mask"] is not None and row["full_ssim_band"] is not None
    if layout == "vpbench":
        assert {i["task"] for i in items} == {"editing"}


def test_aggregate_is_the_mean_of_the_items(evaluated):
    _, _, out, summary = evaluated
    items = json.loads((out / "per_item.json").read_text())["items"]
    for agg in (r for r in summary["rows"] if r["group"] == "all"):
        rows = [row for item in items for row in item["rows"] if row["method"] == agg["method"]]
        assert agg["items"] == len(rows) == 3
        for column in ("denoise_s", "speedup", "full_ssim_mask", "gt_psnr_mask", "gt_temporal_mask",
                       "full_flicker_mask"):
            values = [r[column] for r in rows if r[column] is not None]
            expected = sum(values) / len(values) if values else None
            assert agg[column] == pytest.approx(expected) if values else agg[column] is None, column


def test_vfid_comes_from_the_clips_of_every_item(evaluated):
    layout, _, out, summary = evaluated
    rows = {r["method"]: r for r in summary["rows"] if r["group"] == "all"}
    assert rows["full"]["full_vfid"] is None  # the reference against itself
    assert rows["fewer-steps"]["full_vfid"] is not None and rows["fewer-steps"]["full_vfid"] >= 0
    # 3 items with ground truth give 3 clips of 2-d features: just enough; vace-benchmark has 2, so a note
    assert (rows["full"]["gt_vfid"] is not None) == (layout == "folder")
    assert any("gt_vfid: not computed" in note for note in summary["notes"]) == (layout == "vace-benchmark")
    for item in json.loads((out / "per_item.json").read_text())["items"]:
        folder = evaluate._item_dir(out, item["id"])
        with np.load(folder / "i3d.npz") as archive:
            truth = {"ground_truth"} if item["ground_truth"] else set()
            assert set(archive.files) == {"full", "fewer-steps"} | truth
            assert archive["full"].shape == (1, 2)


def test_vace_layout_reads_metadata_folders_and_leaves_out_unmasked_items(tmp_path):
    found = scan_dataset(make_vace(tmp_path / "vace"), "vace-benchmark")
    assert [(i.id, i.task, i.prompt) for i in found.items] == [
        ("assets/examples/outpainting", "outpainting", PROMPTS[2]),
        ("data/sample000000", "inpainting", PROMPTS[0]),
        ("data/sample000001", "inpainting", PROMPTS[1]),
    ]
    assert found.items[0].ground_truth is None and found.items[1].ground_truth.name == "sample000000_raw_video.mp4"
    assert found.notes == ["1 src_video file(s) without a src_mask (not masked editing) left out"]


def test_aggregate_groups_are_all_items_then_each_task(evaluated):
    layout, _, _, summary = evaluated
    groups = ["all", "inpainting", "outpainting"] if layout == "vace-benchmark" else ["all"]
    assert [r["group"] for r in summary["rows"]] == [g for g in groups for _ in ("full", "fewer-steps")]
    assert [r["method"] for r in summary["rows"]] == ["full", "fewer-steps"] * len(groups)


def test_second_run_skips_finished_items_and_reruns_missing_ones(evaluated, monkeypatch, i3d_file):
    layout, dataset, out, summary = evaluated
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("items/*/result.json")}
    ran = []
    original = evaluate.evaluate_item
    monkeypatch.setattr(evaluate, "evaluate_item", lambda *a, **k: ran.append(a[1].id) or original(*a, **k))
    again = run(dataset, layout, out, i3d_weights=i3d_file)
    assert ran == [] and again["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("items/*/result.json")} == stamps
    victim = sorted(stamps)[0]
    victim.unlink()
    run(dataset, layout, out, i3d_weights=i3d_file)
    assert len(ran) == 1 and victim.is_file()
    changed = run(dataset, layout, out, i3d_weights=i3d_file, seed=1, limit=1)  # other settings: not done yet
    assert len(ran) == 2 and [r["items"] for r in changed["rows"] if r["group"] == "all"] == [1, 1]


def test_inpainting_input_hides_the_masked_pixels(tmp_path):
    item = scan_dataset(make_folder(tmp_path / "d"), "folder").items[0]
    loaded = load_item(item, FRAMES, SIZE, SIZE)
    video, mask = clip(0)
    assert np.array_equal(loaded.ground_truth, video) and np.array_equal(loaded.mask, mask)
    assert (loaded.video[mask] == GREY).all() and np.array_equal(loaded.video[~mask], video[~mask])
    assert loaded.notes == []
    write_clip(item.ground_truth, 255 - video)
    assert any("aligned" in note for note in load_item(item, FRAMES, SIZE, SIZE).notes)


def test_vpbench_inpainting_csv_uses_the_clip_as_ground_truth(tmp_path):
    root = make_vpbench(tmp_path / "vp", edit=False)
    found = scan_dataset(root / "our_video_inpaint.csv", "vpbench")
    assert [i.task for i in found.items] == ["inpainting"] * 3
    loaded = load_item(found.items[0], FRAMES, SIZE, SIZE)
    video, mask = clip(0)
    assert np.array_equal(loaded.mask, mask) and np.array_equal(loaded.ground_truth, video)
    with pytest.raises(UserError, match="our_video_edit.csv"):
        scan_dataset(root, "vpbench")


def test_bad_datasets_and_items(tmp_path):
    with pytest.raises(UserError, match="unknown layout"):
        scan_dataset(tmp_path, "davis")
    with pytest.raises(UserError, match="not found"):
        scan_dataset(tmp_path / "missing", "folder")
    with pytest.raises(UserError, match="no items found"):
        scan_dataset(tmp_path, "folder")
    root = make_folder(tmp_path / "d")
    (root / "clip1" / "prompt.txt").write_text("  \n")
    (root / "clip2" / "mask.mp4").unlink()
    problems = {i.id: i.problem for i in scan_dataset(root, "folder").items}
    assert problems["clip0"] is None and "prompt.txt" in problems["clip1"] and "mask" in problems["clip2"]
    summary = run(root, "folder", tmp_path / "out", methods="full")
    assert [f["item"] for f in summary["failed"]] == ["clip1", "clip2"]
    assert [r["items"] for r in summary["rows"]] == [1]
    with pytest.raises(UserError, match="limit"):
        run(root, "folder", tmp_path / "out", limit=0)


def test_vfid_below_the_minimum_is_flagged_not_computed():
    record = {"id": "a", "task": "t", "ground_truth": True, "rows": [
        {**dict.fromkeys(ITEM_COLUMNS), "item": "a", "task": "t", "method": "full", "identical_to_full": True}]}
    features = {"a": {"full": np.zeros((2, 4)), "ground_truth": np.ones((2, 4))}}
    rows, notes = aggregate([record], ["full"], features)
    assert rows[0]["gt_vfid"] is None
    assert notes == ["all: gt_vfid: not computed: VFID needs at least 5 clips per set for 4-d features, got 2 "
                     "(1 items)"]


def test_kid_works_where_vfid_has_too_few_clips(evaluated):
    layout, _, out, summary = evaluated
    rows = {r["method"]: r for r in summary["rows"] if r["group"] == "all"}
    assert rows["full"]["full_kid"] is None and rows["fewer-steps"]["full_kid"] is not None
    # 3 (folder) or 2 (vace-benchmark) clips with ground truth: enough for KID, not always for VFID; vpbench's
    # editing items have none
    assert (rows["full"]["gt_kid"] is not None) == (layout != "vpbench")
    assert "| GT KID |" in (out / "aggregate.md").read_text()


def test_set_distances_use_the_clips_of_every_item_of_the_group():
    rng = np.random.default_rng(0)
    records, features = [], {}
    for item in ("a", "b", "c"):
        rows = [{**dict.fromkeys(ITEM_COLUMNS), "item": item, "task": "t", "method": name,
                 "identical_to_full": name == "full"} for name in ("full", "pab")]
        records.append({"id": item, "task": "t", "ground_truth": True, "rows": rows})
        features[item] = {key: rng.normal(size=(2, 4)) for key in ("full", "pab", "ground_truth")}
    rows, notes = aggregate(records, ["full", "pab"], features)
    pab = rows[1]
    stack = {key: np.concatenate([features[i][key] for i in "abc"]) for key in ("full", "pab", "ground_truth")}
    assert pab["full_kid"] == pytest.approx(kid(stack["full"], stack["pab"]))
    assert pab["gt_kid"] == pytest.approx(kid(stack["ground_truth"], stack["pab"]))
    assert pab["full_vfid"] == pytest.approx(vfid(stack["full"], stack["pab"]))  # 6 clips of 4-d features
    assert rows[0]["full_kid"] is None and notes == []


def test_method_options_are_part_of_the_settings_and_rerun_items(tmp_path):
    root = make_folder(tmp_path / "d")
    first = run(root, "folder", tmp_path / "out", methods="full,teacache", limit=1)
    assert first["settings"]["method_options"] == {}
    options = {"teacache": {"delta": 1e3, "warmup_steps": 1}}
    again = run(root, "folder", tmp_path / "out", methods="full,teacache", limit=1, method_options=options)
    assert again["settings"]["method_options"] == options
    teacache = next(r for r in again["rows"] if r["method"] == "teacache")
    assert teacache["flops_ratio"] < 1  # the new options ran: the default warm-up would have computed every step
    with pytest.raises(UserError, match="unknown option 'dleta' for teacache"):
        run(root, "folder", tmp_path / "out", methods="full,teacache", method_options={"teacache": {"dleta": 1}})


def test_resume_redoes_items_whose_files_prompt_or_dataset_changed_and_says_so(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    out = tmp_path / "out"
    ran = []
    original = evaluate.evaluate_item
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "evaluate_item", lambda *a, **k: ran.append(a[1].id) or original(*a, **k))
        run(root, "folder", out, methods="full")
        assert ran == ["clip0", "clip1", "clip2"]
        (root / "clip1" / "prompt.txt").write_text("a green car\n")
        write_clip(root / "clip2" / "video.mp4", clip(0)[0])  # another video under the same name
        capsys.readouterr()
        run(root, "folder", out, methods="full")
        assert ran[3:] == ["clip1", "clip2"]
        err = capsys.readouterr().err
        assert "clip0: done earlier, skipped" in err
        for name in ("clip1", "clip2"):
            assert f"{name}: its files or prompt changed since its stored result: running it again" in err
        other = tmp_path / "other"
        other.mkdir()
        (other / "clip0").symlink_to(root / "clip0", target_is_directory=True)  # the same files, another dataset
        run(other, "folder", out, methods="full")
        assert ran[5:] == ["clip0"]
        assert "clip0: its stored result is from another dataset" in capsys.readouterr().err


def test_a_prompt_file_that_is_not_utf8_fails_its_item_only(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "clip1" / "prompt.txt").write_bytes("une voiture caf\u00e9".encode("latin-1"))
    problems = {i.id: i.problem for i in scan_dataset(root, "folder").items}
    assert problems == {"clip0": None, "clip1": "prompt.txt is not UTF-8 text (byte 15): save it as UTF-8",
                        "clip2": None}


@pytest.mark.parametrize("layout", ["vpbench", "vace-benchmark"])
def test_a_dataset_index_that_is_not_utf8_is_one_user_error(tmp_path, layout):
    root = MAKERS[layout](tmp_path / "d")
    index = root / ("our_video_edit.csv" if layout == "vpbench" else "metadata.jsonl")
    index.write_bytes(index.read_bytes() + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"^.*(our_video_edit.csv|metadata.jsonl) is not UTF-8 text \(byte \d+\): "):
        scan_dataset(root, layout)


def test_an_item_whose_mask_is_empty_fails_with_a_clear_reason(tmp_path):
    root = make_folder(tmp_path / "d")
    write_mask_video(root / "clip1" / "mask.mp4", np.zeros((FRAMES, SIZE, SIZE), dtype=bool), 8.0, lossless=True)
    summary = run(root, "folder", tmp_path / "out", methods="full")
    assert summary["failed"] == [{"item": "clip1", "reason": "the mask is empty: nothing to evaluate: pass a mask "
                                                             "(or --box) over the region to edit"}]
