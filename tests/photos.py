"""Real photographs of mixed shapes for the aspect-ratio bucket tests: the images scikit-image
ships in ``skimage.data`` (no download), whole and cropped to portrait and landscape shapes,
plus one too small for every bucket."""
from __future__ import annotations

import numpy as np
from PIL import Image

# name -> (skimage.data function, crop box (left, top, right, bottom) or None for the whole photo)
PHOTOS = {
    "astronaut": ("astronaut", None),  # 512 x 512
    "astronaut_tall": ("astronaut", (128, 0, 384, 512)),  # 256 x 512: 1:2
    "coffee": ("coffee", None),  # 600 x 400: 3:2
    "coffee_tall": ("coffee", (150, 0, 450, 400)),  # 300 x 400: 3:4
    "chelsea": ("chelsea", None),  # 451 x 300
    "chelsea_face": ("chelsea", (100, 0, 300, 300)),  # 200 x 300: 2:3
    "camera": ("camera", None),  # 512 x 512, greyscale
    "camera_wide": ("camera", (0, 128, 512, 384)),  # 512 x 256: 2:1
    "rocket": ("rocket", None),  # 640 x 427
    "rocket_tall": ("rocket", (220, 0, 433, 427)),  # 213 x 427: ~1:2
    "coins": ("coins", None),  # 384 x 303, greyscale
    "hubble": ("hubble_deep_field", None),  # 1000 x 872
    "ihc": ("immunohistochemistry", None),  # 512 x 512
    "ihc_tall": ("immunohistochemistry", (0, 0, 360, 512)),  # 360 x 512
    "page": ("page", None),  # 384 x 191: ~2:1, greyscale
    "text": ("text", None),  # 448 x 172: wider than 2:1
    "camera_tiny": ("camera", (200, 200, 240, 230)),  # 40 x 30: smaller than every test bucket
}
# data.buckets of these tests: the grid of area 96 x 96, step 16, max_ratio 2:
# 64x128, 80x112, 96x96, 112x80, 128x64 (multiples of 16 = 8 x the micro autoencoder's factor 2)
GRID = ["data.buckets.area=9216", "data.buckets.step=16"]


def photo(name: str) -> Image.Image:
    from skimage import data

    fn, box = PHOTOS[name]
    array = getattr(data, fn)()
    image = Image.fromarray(np.asarray(array))
    return image.crop(box) if box is not None else image


def photo_samples(prefix: str = "p") -> list[tuple[str, Image.Image, str, dict]]:
    """``(key, image, caption, meta)`` for :func:`ldm_train.data.shards.write_shards`."""
    return [(f"{prefix}_{name}", photo(name), name.replace("_", " "), {"source": "skimage.data." + PHOTOS[name][0]})
            for name in PHOTOS]
