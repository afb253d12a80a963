"""Generated scenes: deterministic, non-overlapping, rendered as described (checked pixel by pixel at object
centres), anti-aliased, any aspect ratio; every caption level true of its scene (checked from the scene)."""
import math
import re

import numpy as np
import pytest
import torch

from deepfusion_ref.data import (NUMBER_WORDS, PALETTE, SHAPES, Scene, SceneDataset, captions, radius_px, relation,
                                 render)


@pytest.fixture(scope="module")
def scenes():
    ds = SceneDataset(200, 80, 48, seed=7, exact_rgb_prob=0.3)
    return [ds.scene(i) for i in range(len(ds))]


def test_deterministic_by_seed_and_index():
    a, b = SceneDataset(20, seed=4), SceneDataset(20, seed=4)
    for i in (0, 7, 19):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["captions"] == b[i]["captions"]
    assert any(not torch.equal(a[i]["image"], SceneDataset(20, seed=5)[i]["image"]) for i in range(5))


def test_objects_do_not_overlap_and_stay_inside(scenes):
    for s in scenes:
        assert 1 <= len(s.objects) <= 4
        for i, a in enumerate(s.objects):
            ra = radius_px(a, s.width, s.height)
            assert ra <= a.x * s.width <= s.width - ra and ra <= a.y * s.height <= s.height - ra
            for b in s.objects[i + 1:]:
                dist = math.hypot((a.x - b.x) * s.width, (a.y - b.y) * s.height)
                assert dist > ra + radius_px(b, s.width, s.height)


def test_render_shows_the_description(scenes):
    for s in scenes:
        img = render(s)
        assert img.shape == (s.height, s.width, 3) and img.dtype == np.uint8
        for o in s.objects:
            centre = img[int(o.y * s.height), int(o.x * s.width)].astype(int)
            assert np.abs(centre - o.rgb).max() <= 1
        for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            assert tuple(corner) == tuple(s.background_rgb)


def test_edges_are_anti_aliased():
    s = SceneDataset(1, 64, 64, seed=0).scene(0)
    img = render(s).reshape(-1, 3)
    pure = {tuple(s.background_rgb), *(tuple(o.rgb) for o in s.objects)}
    assert sum(tuple(p) not in pure for p in img) > 0  # blended edge pixels exist


def test_captions_are_true_of_the_scene(scenes):
    for s in scenes:
        c = captions(s)
        assert len(c) == 6 and all(len(c[i]) <= len(c[i + 1]) for i in range(1, 5))
        n = len(s.objects)
        assert c[0].startswith(NUMBER_WORDS[n])
        for o in s.objects:
            assert o.shape in c[1] or o.shape + "s" in c[1]
            name = o.colour if not o.colour.startswith("#") else "coloured"
            assert name in c[2]
            assert ("#%02x%02x%02x" % o.rgb) in c[5]  # level 6 always gives the exact colour
            assert o.size in c[4]
        assert s.background in c[3] and s.background in c[5]
        for a, b in zip(s.objects, s.objects[1:]):  # level 5's relations are the positions' relations
            rel = relation(a, b)
            if rel is not None:
                assert f"{rel} a " in c[4]
                if "left of" in rel:
                    assert a.x < b.x
                if "above" in rel:
                    assert a.y < b.y
        # every shape word in the captions is a real shape of this scene
        words = set(re.findall(r"[a-z]+", c[5]))
        assert {w for w in words if w in SHAPES} == {o.shape for o in s.objects}


def test_identical_objects_are_counted():
    from deepfusion_ref.data import SceneObject

    objs = [SceneObject("circle", "red", PALETTE["red"], "small", x, 0.5) for x in (0.2, 0.5, 0.8)]
    objs.append(SceneObject("square", "blue", PALETTE["blue"], "large", 0.5, 0.2))
    c = captions(Scene(objs, "cream", (245, 238, 220), 64, 64))
    assert c[0] == "four shapes" and c[2] == "three red circles and a blue square"


def test_any_aspect_ratio_and_value_range():
    for w, h in [(64, 64), (128, 64), (64, 128), (112, 64), (150, 64)]:
        item = SceneDataset(3, w, h, seed=2)[1]
        assert item["image"].shape == (3, h, w) and -1 <= item["image"].min() and item["image"].max() <= 1
        assert Scene.from_dict(item["scene"]).to_dict() == item["scene"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="length"):
        SceneDataset(0)
    with pytest.raises(ValueError, match="width and height"):
        SceneDataset(5, 8, 64)
    with pytest.raises(IndexError):
        SceneDataset(5)[5]


# --- image folders and aspect buckets ----------------------------------------------------------------------------


def _folder(tmp_path, rows, images=("a.png", "b.png")):
    from PIL import Image

    for i, name in enumerate(images):
        Image.fromarray(np.full((30 + 10 * i, 50, 3), 40 * i, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_image_text_folder_reads_rows_and_crops(tmp_path):
    from deepfusion_ref.data import ImageTextFolder

    root = _folder(tmp_path, ['{"file": "a.png", "captions": ["black", "a black image"]}',
                              '{"file": "b.png", "caption": "grey"}'])
    ds = ImageTextFolder(root, size=(32, 24))
    assert len(ds) == 2 and ds.image_size(1) == (50, 40)
    item = ds[1]
    assert item["image"].shape == (3, 24, 32) and item["captions"] == ["grey"]
    torch.testing.assert_close(item["image"], torch.full((3, 24, 32), 40 / 127.5 - 1), atol=1e-6, rtol=0)
    assert ImageTextFolder(root, size=None)[0]["image"].shape == (3, 30, 50)


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    from deepfusion_ref.data import ImageTextFolder

    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = ['{"file": "a.png", "captions": ["ok"]}', '{"file": "missing.png", "caption": "x"}', "{not json",
            '{"file": "b.png", "captions": []}', '{"file": "broken.png", "caption": "x"}']
    root = _folder(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        ImageTextFolder(root)
    message = str(err.value)
    assert "4 bad rows" in message
    for line in (2, 3, 4, 5):
        assert f"captions.jsonl:{line}:" in message
    with pytest.warns(UserWarning, match="skipped 4 bad rows"):
        ds = ImageTextFolder(root, on_error="skip")
    assert len(ds) == 1 and len(ds.problems) == 4


def test_aspect_buckets_and_batches():
    from deepfusion_ref.data import BucketBatchSampler, aspect_buckets, nearest_bucket

    buckets = aspect_buckets(1024)
    assert buckets == [(1024, 576), (1024, 512), (1024, 432), (1024, 1024), (512, 1024)]
    assert all(max(b) == 1024 and b[0] % 16 == 0 and b[1] % 16 == 0 for b in buckets)
    assert buckets[nearest_bucket(1920, 1080, buckets)] == (1024, 576)
    assert buckets[nearest_bucket(300, 700, buckets)] == (512, 1024)
    sizes = [(1920, 1080), (1000, 1000), (800, 1600), (2350, 1000)] * 5
    sampler = BucketBatchSampler(sizes, buckets, batch_size=3, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))  # every index exactly once
    assert all(len({sampler.bucket_of[i] for i in b}) == 1 for b in batches)
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    dropped = BucketBatchSampler(sizes, buckets, batch_size=3, drop_last=True)
    assert all(len(b) == 3 for b in dropped) and len(dropped) == 4  # 5 per bucket -> one full batch each
    with pytest.raises(ValueError, match="max_side"):
        aspect_buckets(1000)


def test_rendered_scenes_keep_images_scenes_and_the_chosen_caption_levels():
    from deepfusion_ref.data import RenderedScenes

    scenes = SceneDataset(10, 24, 24, seed=9, max_objects=2)
    rendered = RenderedScenes(scenes, levels=[5, 2])  # caption levels, 1-based as everywhere
    for i in range(len(scenes)):
        item = scenes[i]
        assert torch.equal(rendered[i]["image"], item["image"]) and rendered[i]["scene"] == item["scene"]
        assert rendered[i]["captions"] == [item["captions"][4], item["captions"][1]]
    assert rendered.captions() == {c for i in range(10) for c in (scenes[i]["captions"][4], scenes[i]["captions"][1])}
    assert [it["captions"] for it in RenderedScenes(scenes).items] == [scenes[i]["captions"] for i in range(10)]
    for bad in ([], [7], [0], ["4"]):
        with pytest.raises(ValueError, match="levels"):
            RenderedScenes(scenes, levels=bad)


def _bucketed_folder(tmp_path):
    from PIL import Image

    from deepfusion_ref.data import ImageTextFolder

    rows = []
    for k, (w, h) in enumerate([(64, 64), (60, 62), (64, 32), (96, 50), (70, 70), (128, 60)]):
        Image.fromarray(np.full((h, w, 3), 30 * k, np.uint8)).save(tmp_path / f"{k}.png")
        rows.append(f'{{"file": "{k}.png", "captions": ["image {k}", "the image number {k}"]}}')
    (tmp_path / "captions.jsonl").write_text("\n".join(rows))
    return ImageTextFolder(tmp_path, size=None, buckets=[(32, 32), (48, 24)])


def test_buckets_keep_each_images_aspect_and_batches_never_mix_them(tmp_path):
    from deepfusion_ref.data import ImageTextFolder, StepBatches

    folder = _bucketed_folder(tmp_path)
    assert folder.bucket_of == [0, 0, 1, 1, 0, 1]
    assert folder[2]["image"].shape == (3, 24, 48) and folder[0]["image"].shape == (3, 32, 32)
    batches = StepBatches(folder, batch_size=5, seed=3)
    for step in range(30):
        images, prompts = batches[step]
        wide = images.shape[-1] == 48
        # each image of the batch comes from the drawn bucket: its captions name an image of that bucket
        for p in prompts:
            assert p == "" or (int(p.split()[-1]) in (2, 3, 5)) == wide
    widths = [batches[s][0].shape[-1] for s in range(200)]
    assert 0.35 < widths.count(48) / 200 < 0.65  # buckets drawn in proportion to their size (3 of 6)
    with pytest.raises(ValueError, match="buckets: give size=None"):
        ImageTextFolder(tmp_path, buckets=[(32, 32)])
    with pytest.raises(ValueError, match="buckets must be"):
        ImageTextFolder(tmp_path, size=None, buckets=[(32,)])


def test_step_batches_are_a_function_of_seed_and_step_only():
    from deepfusion_ref.data import RenderedScenes, StepBatches

    scenes = RenderedScenes(SceneDataset(10, 16, 16, seed=2))
    a, b = StepBatches(scenes, 4, seed=1), StepBatches(scenes, 4, seed=1)
    for step in (9, 0, 3):  # any order
        assert torch.equal(a[step][0], b[step][0]) and a[step][1] == b[step][1]
    assert not torch.equal(a[0][0], StepBatches(scenes, 4, seed=2)[0][0])
    assert all(p == "" for p in StepBatches(scenes, 4, cond_drop_prob=1.0)[0][1])
    with pytest.raises(ValueError, match="cond_drop_prob"):
        StepBatches(scenes, 4, cond_drop_prob=1.5)


def test_control_maps_are_the_scenes_exact_masks_and_ride_with_their_batches():
    import numpy as np

    from deepfusion_ref.data import (CONTROL_KINDS, ControlMaps, RenderedScenes, SceneDataset, StepBatches, control_map,
                                     render, shape_mask)

    scenes = SceneDataset(10, 24, 20, seed=4, max_objects=3)
    for i in range(len(scenes)):
        scene = scenes.scene(i)
        mask, edges, depth = (control_map(scene, kind) for kind in CONTROL_KINDS)
        assert mask.shape == (20, 24) and mask.dtype == np.float32
        # by hand: pixel centres inside an object are inside the mask, and every object's paint order is its depth
        ys, xs = np.mgrid[0:20, 0:24] + 0.5
        for k, obj in enumerate(scene.objects):
            inside = shape_mask(obj, xs, ys, 24, 20)
            assert (mask[inside] > 0).all()
            cy, cx = int(obj.y * 20), int(obj.x * 24)
            if mask[cy, cx] == 1:
                assert depth[cy, cx] == np.float32((k + 1) / len(scene.objects)) and edges[cy, cx] == 0
        far = np.abs(render(scene).astype(int) - np.array(scene.background_rgb)).max(-1) > 0
        assert not (far & (mask == 0)).any()  # nothing is drawn outside the mask
        assert ((edges == 1) <= ((mask > 0) | (depth > 0))).all()  # outlines only where objects are
    data = ControlMaps(RenderedScenes(scenes, levels=[5]), "edges")
    images, prompts, controls = StepBatches(data, 4, seed=2)[3]
    assert controls.shape == images.shape == (4, 3, 20, 24)
    again = StepBatches(data, 4, seed=2)[3]
    assert torch.equal(again[2], controls) and again[1] == prompts
    for image, control in zip(images, controls):  # each map belongs to its own image
        match = [j for j in range(len(data)) if torch.equal(data[j]["image"], image)]
        assert any(torch.equal(data[j]["control"], control) for j in match)
    with pytest.raises(ValueError, match="kind must be one of"):
        control_map(scenes.scene(0), "canny")


def test_held_out_compositions_never_reach_training_and_fill_the_test_set():
    from deepfusion_ref.data import HELD_OUT_PAIRS, PALETTE, HeldOut, Scene, SceneDataset, SceneObject

    held = HeldOut()
    seen = SceneDataset(300, 32, 32, seed=5, max_objects=3, compositions="seen")
    unseen = SceneDataset(40, 32, 32, seed=5, max_objects=3, compositions="unseen")
    assert not any(held.found(seen.scene(i)) for i in range(len(seen)))
    assert all(held.found(unseen.scene(i)) for i in range(len(unseen)))
    assert torch.equal(unseen[7]["image"], SceneDataset(40, 32, 32, seed=5, max_objects=3,
                                                         compositions="unseen")[7]["image"])  # deterministic
    pairs = [(o.colour, o.shape) for i in range(len(seen)) for o in seen.scene(i).objects]
    assert {c for c, _ in HELD_OUT_PAIRS} <= {c for c, _ in pairs}  # each colour still trains, with other shapes
    # a relation triple by hand: a circle clearly left of a square (level 5: "... left of a ... square")
    obj = lambda shape, x: SceneObject(shape, "grey", PALETTE["grey"], "small", x, 0.5)  # noqa: E731
    scene = Scene([obj("circle", 0.2), obj("square", 0.8)])
    assert held.found(scene) == [("circle", "left of", "square")] and not held.found(Scene([obj("square", 0.2),
                                                                                            obj("circle", 0.8)]))
    custom = SceneDataset(20, 32, 32, seed=1, max_objects=1, compositions="unseen", held_out_pairs=[["red", "circle"]])
    assert all((o.colour, o.shape) == ("red", "circle") for i in range(20) for o in custom.scene(i).objects)
    with pytest.raises(ValueError, match="held_out_pairs"):
        SceneDataset(2, 32, 32, compositions="seen", held_out_pairs=[["crimson", "circle"]])
    with pytest.raises(ValueError, match="compositions must be one of"):
        SceneDataset(2, 32, 32, compositions="novel")
