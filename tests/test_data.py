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
