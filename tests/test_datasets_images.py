"""Images that used to become wrong crops without a word, and records that used to crash without a name."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import PrepareConfig
from datasets.coco import read_coco
from datasets.crop import ALPHA_BACKGROUND, CropError, load_image
from datasets.market1501 import parse_name, read_market1501
from datasets.prepare import prepare_shards
from datasets.records import Record
from tests.test_datasets_readers import bad_case, touch


def load(path) -> np.ndarray:
    return np.asarray(load_image(Record(str(path), identity=1), ""))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    grey = np.full((8, 8), 128 * 257, np.uint16)  # mid grey in 16 bits
    grey[0, 0] = 65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = load(tmp_path / "g16.png")
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb[1:, 1:] == 128).all() and (rgb[0, 0] == 255).all()


def write_png16(path, values: np.ndarray, color_type: int) -> None:
    """A 16-bit-per-channel PNG written by hand (Pillow cannot write 16-bit colour): 2 = RGB, 4 = grey + alpha."""
    height, width = values.shape[:2]
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16bit_colour_and_grey_alpha_pngs_are_scaled(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 128 * 257, 65535, 1000
    write_png16(tmp_path / "rgb48.png", rgb, 2)
    assert (load(tmp_path / "rgb48.png") == (128, 255, 3)).all()
    grey_alpha = np.zeros((4, 4, 2), np.uint16)
    grey_alpha[..., 0], grey_alpha[..., 1] = 64 * 257, 65535
    grey_alpha[0, :, 1] = 0  # transparent first row
    write_png16(tmp_path / "la32.png", grey_alpha, 4)
    out = load(tmp_path / "la32.png")
    assert (out[1:] == 64).all() and (out[0] == ALPHA_BACKGROUND).all()


def test_rgba_is_composited_on_the_documented_background(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:2, :, 3] = 0  # ... transparent in the top half
    rgba[2:, :, 3] = 255  # ... opaque in the bottom half
    rgba[3, :, 3] = 128  # half-transparent last row: halfway between red and the background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = load(tmp_path / "a.png").astype(int)
    assert (rgb[:2] == ALPHA_BACKGROUND).all()
    assert (rgb[2] == (255, 0, 0)).all()
    assert np.abs(rgb[3] - (np.array([255, 0, 0]) * 128 + np.array(ALPHA_BACKGROUND) * 127) / 255).max() <= 1


def test_palette_transparency_is_composited(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 255, 0] + [0, 0, 255] * 255)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert (load(tmp_path / "p.png") == ALPHA_BACKGROUND).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the white half is on top
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    rgb = load(tmp_path / "r.jpg")
    assert rgb.shape[:2] == (40, 20)
    assert rgb[:15].mean() > 200 and rgb[25:].mean() < 50


def test_coco_boxes_use_the_oriented_size(tmp_path):
    root = bad_case(tmp_path)
    img = Image.new("RGB", (64, 48))
    exif = Image.Exif()
    exif[0x0112] = 8
    img.save(root / "images" / "s1.jpg", exif=exif.tobytes())
    query = json.loads((root / "query.json").read_text())
    for image in query["images"]:
        image.pop("width"), image.pop("height")
    query["annotations"][1]["bbox"] = [2, 2, 40, 60]  # fits 48x64 as shown, not 64x48 as stored
    (root / "query.json").write_text(json.dumps(query))
    train = read_coco(root)["train"]
    assert [r.box for r in train if r.meta["annotation_id"] == 9] == [(2, 2, 40, 60)]


def test_unrenderable_image_is_refused_and_counted(tmp_path):
    Image.fromarray(np.full((16, 16), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "ok.jpg")
    with pytest.raises(CropError, match=r"unsupported_image: .*f\.tif: floating-point"):
        load(tmp_path / "f.tif")
    recs = [Record(str(tmp_path / n), identity=i, label=i, split="train") for i, n in enumerate(("f.tif", "ok.jpg"))]
    manifest = prepare_shards({"train": recs}, tmp_path / "shards", PrepareConfig(workers=1), progress=False)
    entry = manifest["splits"]["train"]
    assert entry["count"] == 1 and [s["reason"] for s in entry["skipped"]] == ["unsupported_image"]


def test_market_camera_beyond_the_dataset_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"0001_c9s1_000001_00\.jpg: camera c9 does not exist in Market-1501.*c1\.\.c6"
    ):
        parse_name(tmp_path / "0001_c9s1_000001_00.jpg")
    with pytest.raises(ValueError, match=r"camera c7 does not exist in Market-1501"):
        parse_name(tmp_path / "0001_c7s1_000001_00.jpg")
    assert parse_name(tmp_path / "0005_c8_f0100000.jpg")[1] == 7  # DukeMTMC-reID has 8 cameras
    with pytest.raises(ValueError, match=r"camera c9 does not exist in DukeMTMC-reID"):
        parse_name(tmp_path / "0005_c9_f0100000.jpg")


def test_identity_beyond_int64_names_the_file(tmp_path):
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        touch(tmp_path / sub / "0001_c1s1_000001_00.jpg")
    touch(tmp_path / "bounding_box_test" / "99999999999999999999_c1s1_000001_00.jpg")
    with pytest.raises(ValueError, match=r"99999999999999999999_c1s1_000001_00\.jpg: identity .* fits in 64 bits"):
        read_market1501(tmp_path)


@pytest.mark.parametrize("bbox", [["2", "2", "20", "30"], None, [2, 2, None, 30], [2, 2, 20], "2,2,20,30"])
def test_coco_bbox_that_is_not_numbers_names_the_record(tmp_path, bbox):
    root = bad_case(tmp_path, ann={"id": 9, "image_id": 1, "category_id": 1, "bbox": bbox})
    with pytest.raises(ValueError, match=r"query\.json: annotation 9 has bbox .*expected \[x, y, w, h\], 4 numbers"):
        read_coco(root)


def test_coco_string_category_id_is_not_called_unknown(tmp_path):
    root = bad_case(tmp_path, ann={"id": 9, "image_id": 1, "category_id": "1", "bbox": [2, 2, 20, 30]})
    with pytest.raises(ValueError, match=r"query\.json: annotation 9 has category_id '1' \(str\); ids are integers"):
        read_coco(root)


def test_recognition_queries_are_rendered_as_the_shards_crops(tmp_path):
    """A query image must look as it did when the gallery and training crops were made (EXIF, 16 bits, alpha):
    the query's boxes are drawn on the image as shown."""
    from inference.recognize import load_rgb

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "g16.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    for name in ("r.jpg", "g16.png", "a.png"):
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name)), load(tmp_path / name)), name
    from datasets.crop import CropSettings
    from inference.draw import draw_image

    canvas = draw_image(tmp_path / "r.jpg", [], CropSettings("", 0.0, 1, 0, 95))  # result boxes: as shown
    assert canvas.width * 2 == canvas.height
    Image.fromarray(np.full((16, 16), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"query image .*f\.tif"):
        load_rgb(tmp_path / "f.tif")


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_png_colour_key_transparency_is_composited(tmp_path, mode):
    """A PNG tRNS colour key (one colour or grey value transparent) in RGB, grey and 16-bit grey images."""
    if mode == "RGB":
        pixels, key = np.zeros((4, 4, 3), np.uint8), (0, 255, 0)
    else:
        pixels, key = np.zeros((4, 4), np.uint16 if mode == "I;16" else np.uint8), 700 if mode == "I;16" else 7
    pixels[:2] = key  # the top half has the transparent key, the bottom half is opaque black
    Image.fromarray(pixels).save(tmp_path / "k.png", transparency=key)
    assert Image.open(tmp_path / "k.png").mode == mode
    rgb = load(tmp_path / "k.png")
    assert (rgb[:2] == ALPHA_BACKGROUND).all() and (rgb[2:] == 0).all()
