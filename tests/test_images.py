import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED, shared_path
from minigpt.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageProcessor,
    ImageTooLargeError,
    load_image,
)

FIXTURES = SHARED / "fixtures" / "lavis-tiny"


def gradient(w: int = 40, h: int = 30) -> Image.Image:
    x = np.arange(w * h * 3, dtype=np.uint32).reshape(h, w, 3) * 7 % 256
    return Image.fromarray(x.astype(np.uint8), "RGB")


@pytest.mark.fidelity
def test_eval_matches_lavis_fixture():
    from safetensors.torch import load_file

    shared_path("fixtures", "lavis-tiny", "expected.safetensors")

    expected = load_file(str(FIXTURES / "expected.safetensors"))["pixel_values"]
    got = ImageProcessor(size=56).batch([FIXTURES / "image.png"])
    assert got.shape == expected.shape == (1, 3, 56, 56)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6


def test_eval_is_bicubic_resize_then_clip_normalisation():
    img = gradient()
    out = ImageProcessor(size=16)(img)
    ref = np.asarray(img.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_same_result_from_path_bytes_array_and_pil(tmp_path):
    img = gradient()
    img.save(tmp_path / "a.png")
    proc = ImageProcessor(size=8)
    ref = proc(img)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes(), np.asarray(img)):
        assert torch.equal(proc(source), ref)


def test_missing_file_names_path_and_origin(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="image file not found: .*nope.jpg.*data.json:3"):
        load_image(missing, origin="data.json:3")


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match=r"cannot read image .*junk.jpg.*cannot identify"):
        load_image(tmp_path / "junk.jpg")
    buf = io.BytesIO()
    gradient(64, 64).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut.jpg \(in shard.tar/7\).*truncated"):
        load_image(tmp_path / "cut.jpg", origin="shard.tar/7")
    with pytest.raises(ImageError, match=r"^cannot read image of 12 bytes: cannot identify image file$"):
        load_image(b"\x89PNG garbage")  # not Pillow's <_io.BytesIO object at 0x...>
    with pytest.raises(ImageError, match=r"cut.jpg \(in x\): .*truncated"):
        load_image(Image.open(tmp_path / "cut.jpg"), origin="x")  # a lazily opened PIL image is decoded too


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half black: ~grey
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 127]
    la = np.asarray(load_image(np.array([[[0, 0]]], np.uint8)))  # HWC with 2 channels = LA
    assert la.tolist() == [[[255, 255, 255]]]


def test_palette_with_transparency_and_grey_and_cmyk():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert np.asarray(load_image(p)).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    assert np.asarray(load_image(Image.new("L", (1, 1), 77))).tolist() == [[[77, 77, 77]]]
    assert np.asarray(load_image(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))).tolist() == [[[255, 255, 255]]]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    for source in (tmp_path / "g16.png", a, a.astype(">u2"), Image.fromarray(a.astype(np.int32), "I")):
        out = np.asarray(load_image(source))
        assert out[0, :, 0].tolist() == [0, 1, 128, 255], source
        assert (out[..., 0] == out[..., 2]).all()


def test_float_and_other_int_ranges():
    assert np.asarray(load_image(np.array([[0.0, 0.5, 1.0]])))[0, :, 0].tolist() == [0, 128, 255]
    wide = np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)
    assert np.asarray(load_image(Image.fromarray(wide, "F")))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(np.array([[0, 200]], np.int64)))[0, :, 0].tolist() == [0, 200]
    assert np.asarray(load_image(np.array([[False, True]])))[0, :, 0].tolist() == [0, 255]


def test_bad_array_shape_and_type():
    with pytest.raises(ImageError, match="HW or HWC"):
        load_image(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ImageError, match="cannot load an image from int"):
        load_image(3, origin="x")


def test_tensor_is_taken_as_processed_pixels():
    proc = ImageProcessor(size=8)
    t = torch.randn(3, 8, 8)
    assert torch.equal(proc(t), t)
    with pytest.raises(ImageError, match=r"\(3, 8, 8\)"):
        proc(torch.zeros(3, 9, 9))


def test_train_crop_is_deterministic_with_seed_and_varies():
    img = gradient(97, 73)
    a = ImageProcessor(size=24, train=True, seed=1).batch([img] * 4)
    b = ImageProcessor(size=24, train=True, seed=1).batch([img] * 4)
    c = ImageProcessor(size=24, train=True, seed=2).batch([img] * 4)
    assert a.shape == (4, 3, 24, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # successive calls draw new crops
    assert not torch.equal(a[0], ImageProcessor(size=24)(img))


def test_train_crop_follows_torchvision_algorithm():
    # 400x2: no try fits (h >= 17 > 2), so torchvision's centre-crop fallback at ratio 4/3 is used: w = 3, left 198.
    wide = Image.fromarray(np.tile(np.arange(400) % 256, (2, 1)).astype(np.uint8), "L").convert("RGB")
    out = ImageProcessor(size=4, train=True, seed=0)._random_resized_crop(wide)
    expected = wide.crop((198, 0, 201, 2)).resize((4, 4), Image.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_hflip_option():
    # Square image with min_scale 1: no try fits unless the ratio is exactly 1, so the crop is the whole image.
    img = gradient(50, 50)
    plain = ImageProcessor(size=8)(img)
    flipped = torch.flip(plain, dims=[2])
    outs = ImageProcessor(size=8, train=True, min_scale=1.0, hflip=True, seed=3).batch([img] * 16)
    assert all(torch.equal(o, plain) or torch.equal(o, flipped) for o in outs)
    assert any(torch.equal(o, plain) for o in outs) and any(torch.equal(o, flipped) for o in outs)
    assert all(torch.equal(o, plain) for o in ImageProcessor(size=8, train=True, min_scale=1.0).batch([img] * 8))


def test_batch_of_nothing_and_invalid_min_scale():
    assert ImageProcessor(size=8).batch([]).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="min_scale"):
        ImageProcessor(min_scale=0)


def png_bomb(width: int, height: int) -> bytes:
    """A few-byte PNG whose header claims ``width`` x ``height`` (a pixel bomb as far as the header goes)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC (type + data)
    return bytes(data)


@pytest.fixture()
def no_decoding(monkeypatch):
    """Any pixel decode fails the test: what is refused must be refused from the header."""
    from PIL import ImageFile

    def load(self):
        raise AssertionError(f"decoded {self.size}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_pixel_bomb_is_refused_from_the_header(tmp_path, no_decoding):
    (tmp_path / "bomb.png").write_bytes(png_bomb(13000, 13000))
    message = f"13000x13000 = 169,000,000 pixels, more than the limit of {DEFAULT_MAX_PIXELS:,}"
    assert DEFAULT_MAX_PIXELS == 16_777_216
    with pytest.raises(ImageTooLargeError, match=rf"image .*bomb.png \(in data.json:4\) has {message}$"):
        load_image(tmp_path / "bomb.png", origin="data.json:4")
    with pytest.raises(ImageTooLargeError, match=r"image of \d+ bytes has 13000x13000"):
        load_image(png_bomb(13000, 13000))
    with pytest.raises(ImageTooLargeError, match="bomb.png has 13000x13000"):
        load_image(Image.open(tmp_path / "bomb.png"))  # a lazily opened PIL image: checked before load()
    with pytest.raises(ImageTooLargeError, match="more than the limit of 1,000"):
        ImageProcessor(max_pixels=1000)(png_bomb(40, 30))
    with pytest.raises(ImageTooLargeError, match="Image size .* exceeds limit"):  # beyond Pillow's own limit too
        load_image(png_bomb(20000, 20000), max_pixels=None)


def test_pillow_bomb_warning_is_not_shown_where_our_limit_refuses(no_decoding):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError, match="13000x13000"):
            load_image(png_bomb(13000, 13000))  # over Pillow's warning threshold (~89 MP) too
    assert [str(w.message) for w in caught] == []


def test_pixel_limit_is_a_parameter(tmp_path):
    path = tmp_path / "g.png"
    gradient(40, 30).save(path)
    with pytest.raises(ImageTooLargeError, match=r"g.png has 40x30 = 1,200 pixels, more than the limit of 1,199$"):
        load_image(path, max_pixels=1199)
    assert load_image(path, max_pixels=1200).size == (40, 30)
    decoded = load_image(path, max_pixels=None)  # in memory already: a later step does not refuse it
    assert load_image(decoded, max_pixels=1000).size == (40, 30)
    assert load_image(np.zeros((30, 40, 3), np.uint8), max_pixels=1000).size == (40, 30)
    assert ImageProcessor(max_pixels=None)(path).shape == (3, 224, 224)
