"""Scene scorer: CIEDE2000 against all 34 published pairs of Sharma, Wu & Dalal (2005); >= 99% right on clean renders
at 32x32, 64x64 and 64x40; every corruption fails exactly the question it breaks; small noise and blur flip nothing;
images without objects (noise, blank frames) score near zero and every question about an absent object is wrong;
saturation by hand; report files written and readable."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from deepfusion_ref.data import BACKGROUNDS, Scene, SceneObject, captions, render, sample_scene
from deepfusion_ref.evaluate import (CATEGORIES, CORRUPTIONS, aggregate, as_rgb_array, ciede2000, corrupt_scene, detect,
                                     isolation, noise_level, saturation_fraction, score_scene, side_by_side_report,
                                     srgb_to_lab)

# Sharma, Wu, Dalal (2005), Table 1: L1 a1 b1 L2 a2 b2 dE00
SHARMA = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]
SIZES_UNDER_TEST = [(32, 32), (64, 64), (64, 40)]


def test_ciede2000_matches_sharma_pairs():
    t = np.array(SHARMA)
    got = ciede2000(t[:, :3], t[:, 3:6])
    np.testing.assert_allclose(got, t[:, 6], atol=5e-5)
    np.testing.assert_allclose(ciede2000(t[:, 3:6], t[:, :3]), got, atol=1e-12)  # symmetric
    assert ciede2000([50, 10, -20], [50, 10, -20]) == 0


def test_srgb_to_lab_reference_values():
    # white, black and sRGB primaries (published conversions, D65)
    np.testing.assert_allclose(srgb_to_lab([[255, 255, 255], [0, 0, 0]]), [[100, 0, 0], [0, 0, 0]], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.02)
    np.testing.assert_allclose(srgb_to_lab([0, 255, 0]), [87.73, -86.18, 83.18], atol=0.02)
    np.testing.assert_allclose(srgb_to_lab([0, 0, 255]), [32.30, 79.19, -107.86], atol=0.02)


def test_image_forms_agree_and_bad_input_is_named():
    scene = sample_scene(np.random.default_rng(1), 48, 32)
    img = render(scene)
    tensor = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    ref = score_scene(img, scene)
    assert ref["all_correct"]
    assert score_scene(tensor, scene.to_dict())["questions"] == ref["questions"]
    assert score_scene(Image.fromarray(img), scene)["questions"] == ref["questions"]
    with pytest.raises(ValueError, match="image"):
        as_rgb_array(img[..., :2])
    with pytest.raises(ValueError, match="scene"):
        score_scene(img, "a red circle")


def _scenes(w, h, n, seed):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, w, h, exact_rgb_prob=0.3) for _ in range(n)]


@pytest.mark.parametrize("size", SIZES_UNDER_TEST)
def test_clean_renders_score_at_least_99_percent(size):
    results = [score_scene(render(s), s) for s in _scenes(*size, 120, seed=11)]
    agg = aggregate(results)
    assert json.loads(json.dumps(agg)) == agg  # JSON-serialisable as is
    assert agg["overall"] >= 0.99 and agg["images_all_correct"] >= 0.95, agg
    assert all(agg["questions"][c] > 0 for c in agg["questions"])
    assert agg["exact_colour"]["n"] > 0 and agg["exact_colour"]["ciede2000_mean"] < 1.0


def _expected_failure(kind, i, wrong):
    per_object = sorted((q["category"], q["object"]) for q in wrong if "object" in q)
    counts = [q["kind"] for q in wrong if q["category"] == "count"]
    positions = [q["objects"] for q in wrong if q["category"] == "position"]
    if kind in ("colour", "shape"):
        return per_object == [(kind, i)] and not positions
    if kind == "move":
        return not per_object and positions and all(i in p for p in positions)
    if kind == "drop":
        return (per_object == sorted((c, i) for c in ("colour", "presence", "shape", "size")) and "all shapes" in counts
                and all(i in p for p in positions))
    return not per_object and not positions and "all shapes" in counts and len(counts) == 2  # extra copy


@pytest.mark.parametrize("size", SIZES_UNDER_TEST)
def test_corruptions_fail_the_right_question(size):
    rng = np.random.default_rng(5)
    tally = {k: 0 for k in CORRUPTIONS}
    for scene in _scenes(*size, 30, seed=21):
        for kind in CORRUPTIONS:
            out = corrupt_scene(scene, kind, rng)
            if out is None:
                continue
            bad, i = out
            wrong = [q for q in score_scene(render(bad), scene)["questions"] if not q["correct"]]
            assert _expected_failure(kind, i, wrong), (kind, i, scene, wrong)
            tally[kind] += 1
    assert all(tally[k] >= 20 for k in ("colour", "shape", "drop", "extra")) and tally["move"] >= 3, tally


def test_corrupted_colour_counts_once_for_its_kind():
    # two red circles, one recoloured blue: colour of that one wrong, the kind count says 1 of 2
    objs = [SceneObject("circle", "red", (220, 30, 50), "large", 0.25, 0.5),
            SceneObject("circle", "red", (220, 30, 50), "large", 0.75, 0.5)]
    scene = Scene(objs, "cream", (245, 238, 220), 64, 64)
    bad = Scene([objs[0], SceneObject("circle", "blue", (30, 90, 220), "large", 0.75, 0.5)], "cream",
                (245, 238, 220), 64, 64)
    res = score_scene(render(bad), scene)
    wrong = [q for q in res["questions"] if not q["correct"]]
    assert [(q["category"], q.get("object"), q.get("observed")) for q in wrong] == [("colour", 1, "#1e5adc"),
                                                                                    ("count", None, 1)]


@pytest.mark.parametrize("size", [(32, 32), (64, 40)])
def test_small_noise_and_blur_flip_nothing(size):
    rng = np.random.default_rng(9)
    results = []
    for scene in _scenes(*size, 40, seed=31):
        x = ndimage.gaussian_filter(render(scene).astype(float), (0.5, 0.5, 0))
        t = torch.from_numpy(x).permute(2, 0, 1).float() / 255
        t = t + 0.015 * torch.from_numpy(rng.standard_normal(t.shape)).float()  # 0.03 in [-1, 1] units
        results.append(score_scene(t.clamp(0, 1), scene))
    assert aggregate(results)["overall"] >= 0.99


def _objectless(kind, scene, rng):
    "An image with none of the scene's objects: noise, or a blank frame of the background or of another colour."
    w, h = scene.width, scene.height
    if kind == "uniform":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind.startswith("grey"):  # Gaussian noise around mid-grey (sigma in [-1, 1] units), clipped to [0, 1]
        return (0.5 + float(kind[4:]) / 2 * torch.from_numpy(rng.standard_normal((3, h, w))).float()).clamp(0, 1)
    if kind == "blank":
        return render(Scene([], scene.background, scene.background_rgb, w, h))
    if kind == "other background":
        other = [c for n, c in BACKGROUNDS.items() if n != scene.background]
        return np.full((h, w, 3), other[rng.integers(len(other))], np.uint8)
    return np.full((h, w, 3), scene.objects[0].rgb, np.uint8)  # blank in the colour of a described object


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (48, 48), (64, 40)])
@pytest.mark.parametrize("kind", ["uniform", "grey0.1", "grey0.3", "grey1", "blank", "other background", "object colour"])
def test_images_without_objects_score_near_zero(size, kind):
    for seed in (0, 1):
        rng = np.random.default_rng(100 + seed)
        scenes = _scenes(*size, 12, seed=200 + seed)
        agg = aggregate([score_scene(_objectless(kind, s, rng), s) for s in scenes])
        assert agg["overall"] <= 0.15 and agg["accuracy"]["presence"] <= 0.1, (kind, size, seed, agg["accuracy"])
        assert agg["images_all_correct"] == 0


def test_absent_objects_make_all_their_questions_wrong():
    # one object drawn of three: every question about the other two is wrong, whatever the category
    objs = [SceneObject("circle", "red", (220, 30, 50), "large", 0.25, 0.3),
            SceneObject("star", "blue", (30, 90, 220), "small", 0.75, 0.3),
            SceneObject("square", "#0a8282", (10, 130, 130), "small", 0.5, 0.75)]
    scene = Scene(objs, "cream", (245, 238, 220), 64, 64)
    res = score_scene(render(Scene(objs[:1], "cream", (245, 238, 220), 64, 64)), scene)
    by_object = {}
    for q in res["questions"]:
        for i in ([q["object"]] if "object" in q else q.get("objects", [])):
            by_object.setdefault(i, []).append(q)
    assert all(q["correct"] for q in by_object[0] if "object" in q)  # the drawn object is right
    for i in (1, 2):
        assert {q["category"] for q in by_object[i]} == {"presence", "shape", "colour", "size", "position"}
        assert not any(q["correct"] for q in by_object[i]), by_object[i]
    counts = {q["kind"]: q["correct"] for q in res["questions"] if q["category"] == "count"}
    assert counts == {"red circle": True, "blue star": False, "#0a8282 square": False, "all shapes": False}
    assert res["objects"][1]["detection"] is None and res["objects"][2]["colour_error"] is None
    # aggregate counts them (not skipped): 1 of 3 present, 1 of 3 right shapes, ...
    agg = aggregate([res])
    assert all(agg["questions"][c] > 0 for c in CATEGORIES)
    assert agg["accuracy"]["presence"] == agg["accuracy"]["shape"] == agg["accuracy"]["colour"] == pytest.approx(1 / 3)
    assert agg["accuracy"]["position"] == 0 and agg["exact_colour"] == {"n": 1, "found": 0, "ciede2000_mean": None,
                                                                        "ciede2000_median": None}
    # an empty image: every question wrong
    empty = aggregate([score_scene(render(Scene([], "cream", (245, 238, 220), 64, 64)), scene)])
    assert all(v == 0 for v in empty["accuracy"].values()) and empty["overall"] == 0


def test_noise_specks_and_patches_are_not_objects():
    rng = np.random.default_rng(3)
    scene = _scenes(32, 32, 1, seed=4)[0]
    noisy = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert detect(noisy, scene.background_rgb) == []
    assert detect(noisy, scene.background_rgb, max_fit_error=9, size_tolerance=9) == []  # isolation alone rejects noise
    patch = render(Scene([], scene.background, scene.background_rgb, 32, 32))
    patch[4:28, 4:28] = (220, 30, 50)  # a square far larger than any object
    assert detect(patch, scene.background_rgb) == []
    dets = detect(render(scene), scene.background_rgb)
    assert len(dets) == len(scene.objects) and all(d["isolation"] > 0.8 and d["fit_error"] < 0.1 for d in dets)
    with pytest.raises(ValueError, match="min_isolation"):
        detect(render(scene), scene.background_rgb, min_isolation=2)


def test_noise_level_and_isolation_by_hand():
    rng = np.random.default_rng(6)
    flat = np.full((64, 64, 3), 100.0)
    assert noise_level(flat) == 0 and noise_level(render(_scenes(64, 64, 1, seed=5)[0])) == 0
    for sigma in (3.0, 12.0):
        assert noise_level(flat + sigma * rng.standard_normal(flat.shape)) == pytest.approx(sigma, rel=0.05)
    mask = np.zeros((10, 10), bool)
    mask[4:6, 4:6] = True
    background = np.ones((10, 10), bool)
    background[1, :] = False  # the ring is rows / columns 1..8 less 3..6: 64 - 16 = 48 pixels; row 1 holds 8 of them
    assert isolation(mask, background) == pytest.approx(40 / 48)
    assert isolation(np.ones((5, 5), bool), np.ones((5, 5), bool)) == 0  # no ring at all


@pytest.mark.parametrize("size", [(32, 32), (64, 40)])
def test_plausible_imperfect_samples_still_score_well(size):
    # blur and noise of a soft generator; the noisy case (15 levels of 255) is smoothed before segmentation
    for blur, noise, floor in ((0.7, 0.05, 0.95), (0.5, 0.12, 0.85)):
        rng = np.random.default_rng(12)
        results = []
        for scene in _scenes(*size, 30, seed=51):
            x = ndimage.gaussian_filter(render(scene).astype(float), (blur, blur, 0))
            t = torch.from_numpy(x).permute(2, 0, 1).float() / 255  # noise in [-1, 1] units, halved in [0, 1]
            noisy = t + noise / 2 * torch.from_numpy(rng.standard_normal(t.shape)).float()
            results.append(score_scene(noisy.clamp(0, 1), scene))
        agg = aggregate(results)
        assert agg["overall"] >= floor and agg["accuracy"]["presence"] >= 0.95, (blur, noise, agg["accuracy"])


def test_saturation_fraction_by_hand():
    a = np.full((2, 3, 3), 100, np.uint8)
    a[0, 0] = (0, 255, 7)  # two of 18 channel values at a limit
    assert saturation_fraction(a) == pytest.approx(2 / 18)
    assert saturation_fraction([a, Image.fromarray(a)]) == pytest.approx(4 / 36)
    t = torch.tensor([[[0.0, 0.01], [1.0, 3.0]]]).expand(3, 2, 2)  # x <= 0 or x >= 1: 0, 1 and 3, 3 of 4 per channel
    assert saturation_fraction(t) == pytest.approx(0.75)
    assert saturation_fraction([t[0:1], torch.full((1, 2, 2), 0.5)]) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="images"):
        saturation_fraction(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images: float tensors must be in \[0, 1\]"):
        saturation_fraction(t * 2 - 1)  # the models' [-1, 1]: ambiguous, refused


def test_side_by_side_report_files(tmp_path):
    scenes = _scenes(32, 32, 3, seed=41)
    rng = np.random.default_rng(2)
    good = [render(s) for s in scenes]
    recoloured = [torch.from_numpy(render(corrupt_scene(s, "colour", rng)[0])).permute(2, 0, 1).float() / 255
                  for s in scenes]
    prompts = [captions(s)[4] for s in scenes]
    out = side_by_side_report(good, recoloured, prompts, tmp_path / "cmp" / "grid.png", ("base", "fused"), scenes=scenes)
    with Image.open(out["png"]) as grid:
        grid.load()
        assert grid.mode == "RGB" and grid.width >= 2 * 128 and grid.height >= 3 * 128
    page = (tmp_path / "cmp" / "grid.html").read_text(encoding="utf-8")
    assert page.count("<img") == 6 and "base" in page and "fused" in page
    import html
    assert all(html.escape(p) in page for p in prompts)
    assert out["scores"][0] == [1.0, 1.0, 1.0] and all(s < 1 for s in out["scores"][1])
    with pytest.raises(ValueError, match="images_a"):
        side_by_side_report(good[:2], recoloured, prompts, tmp_path / "x.png")


def test_score_prompts_scores_matched_pairs_and_the_other_prompt_floor():
    from deepfusion_ref.evaluate import score_prompts, score_scene

    rng = np.random.default_rng(21)
    scenes = [sample_scene(rng, 32, 32, max_objects=2, exact_rgb_prob=0.0) for _ in range(5)]
    images = torch.stack([torch.from_numpy(render(s)).permute(2, 0, 1).float() / 255 for s in scenes])
    report = score_prompts(images, scenes, pairs="consecutive")
    assert report["matched"]["overall"] == 1.0 and report["matched"]["n_images"] == 5
    floor = aggregate([score_scene(images[i], scenes[(i + 1) % 5], pairs="consecutive") for i in range(5)])
    assert report["floor"] == floor and floor["overall"] < 1.0
    assert [r["questions"] for r in report["scored"]] == [score_scene(im, s, pairs="consecutive")["questions"]
                                                         for im, s in zip(images, scenes)]
    with pytest.raises(ValueError, match="equal length"):
        score_prompts(images[:3], scenes)
    with pytest.raises(ValueError, match=">= 2"):  # a single image would be its own floor
        score_prompts(images[:1], scenes[:1])


def test_swap_word_changes_only_the_first_objects_word():
    from deepfusion_ref.evaluate import swap_word

    scene = Scene([SceneObject("star", "grey", (128, 128, 128), "small", 0.3, 0.4)], "light grey", (215, 215, 215),
                  32, 32)
    caption = captions(scene)[4]
    assert caption == "a small grey star; light grey background"
    assert swap_word(caption, scene, "colour").endswith("; light grey background")  # the background keeps its word
    assert "grey star" not in swap_word(caption, scene, "colour")
    assert swap_word(caption, scene, "shape") == "a small grey diamond; light grey background"
    assert swap_word(caption, scene, "size") == "a large grey star; light grey background"
    with pytest.raises(ValueError, match="attribute"):
        swap_word(caption, scene, "texture")
    with pytest.raises(ValueError, match="caption"):
        swap_word("one shape", scene, "shape")


def test_caption_sensitivity_is_the_weighted_loss_gap():
    from deepfusion_ref.evaluate import caption_sensitivity

    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    right, wrong = x0 + 0.1, x0 - 0.2
    # a denoiser that returns its condition: loss ||c - x0||^2 at every noise level, weighted by EDM's lambda(sigma)
    gap = caption_sensitivity(lambda x, s, c: c, right, wrong, x0, sigmas=(0.25, 2.0))
    lam = torch.tensor([(s**2 + 0.25) / (s * 0.5) ** 2 for s in (0.25, 2.0)])
    torch.testing.assert_close(gap, lam * (0.04 - 0.01))
    # a denoiser that ignores its condition (here: a fixed blend of the noisy input) shows no gap at all
    assert caption_sensitivity(lambda x, s, c: 0.5 * x, right, wrong, x0).abs().max() == 0
    with pytest.raises(ValueError, match="sigmas"):
        caption_sensitivity(lambda x, s, c: c, right, wrong, x0, sigmas=(0.0,))
