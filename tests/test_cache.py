"""The decoded-image cache: pixels as torchvision decodes and resizes them, reuse, new keys, atomic builds, errors."""

import io
import logging
import os
import subprocess

import pytest
import torch
import torchvision.io
from PIL import Image
from rich.console import Console
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png, read_file
from torchvision.transforms.v2 import functional as F

from clrun.data import augment
from clrun.data.cache import decode_images
from clrun.data.image_files import ImageList
from clrun.errors import ClrunError

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; clrun uses them until they are removed
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
QUIET = Console(quiet=True)
SIZE = (24, 32)  # (H, W), not square, so that a swap of height and width shows


def picture(height: int, width: int, channels: int, seed: int) -> torch.Tensor:
    """A uint8 (C, H, W) image: a smooth gradient with noise, so that resizing changes pixels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, channels, 4, 5, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear")[0]
    return (smooth * 200 + torch.rand(channels, height, width, generator=g) * 55).to(torch.uint8)


def write_files(folder, seed: int = 0) -> ImageList:
    """A JPEG (50x37), an RGBA PNG (41x63) and a grayscale PNG (30x45), labels 2, 0, 1."""
    folder.mkdir(exist_ok=True)
    specs = [("a.jpg", 37, 50, 3), ("b.png", 63, 41, 4), ("c.png", 45, 30, 1)]
    paths = []
    for name, height, width, channels in specs:
        image = picture(height, width, channels, seed + len(paths))
        if channels == 4:  # torchvision encodes no alpha channel
            Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGBA").save(folder / name)
        else:
            data = encode_jpeg(image, quality=90) if name.endswith(".jpg") else encode_png(image)
            (folder / name).write_bytes(data.numpy().tobytes())
        paths.append(folder / name)
    return ImageList(paths=tuple(paths), labels=(2, 0, 1))


def reference(path, size, resize: str, crop=None) -> torch.Tensor:
    """What torchvision makes of `path`: decoded as RGB, cropped to (top, left, height, width), resized."""
    image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    if crop is not None:
        image = F.crop(image, *crop)
    if resize == "stretch":
        return F.resize(image, list(size), antialias=True)
    return F.center_crop(F.resize(image, [min(size)], antialias=True), list(size))


def folders(cache_dir) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


@pytest.mark.parametrize("resize", ["short_side", "stretch"])
def test_pixels_are_torchvision_decode_and_resize_of_each_file(tmp_path, resize):
    files = write_files(tmp_path / "images")
    out = decode_images(files, SIZE, resize, tmp_path / "cache", name="toy", console=QUIET)
    assert out.images.dtype == torch.uint8 and out.images.shape == (3, 3, *SIZE)
    for i, path in enumerate(files.paths):
        assert torch.equal(out.images[i], reference(path, SIZE, resize)), path.name
    gray = out.images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale PNG as three equal channels
    assert out.labels.tolist() == [2, 0, 1] and out.labels.dtype == torch.int64
    assert out.kept.tolist() == [0, 1, 2] and out.skipped == ()

    # boxes (left, top, width, height) crop first; one reaching past the image's left and bottom edges is clipped
    boxed = ImageList(files.paths[:2], files.labels[:2], boxes=((3.0, 5.0, 30.0, 20.0), (-4.0, 30.0, 20.0, 50.0)))
    out = decode_images(boxed, SIZE, resize, tmp_path / "cache", name="toy", console=QUIET)
    assert torch.equal(out.images[0], reference(files.paths[0], SIZE, resize, crop=(5, 3, 20, 30)))
    assert torch.equal(out.images[1], reference(files.paths[1], SIZE, resize, crop=(30, 0, 33, 16)))


def test_second_call_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    files = write_files(tmp_path / "images")
    console = Console(record=True, file=io.StringIO(), width=120)
    first = decode_images(files, SIZE, "short_side", tmp_path / "cache", name="toy", console=console)
    shown = console.export_text()  # and clears the record
    assert "decoding toy" in shown and "3/3" in shown and "images/s" in shown

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(torchvision.io, "decode_image", no_decoding)
    second = decode_images(files, SIZE, "short_side", tmp_path / "cache", name="toy", console=console)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert console.export_text() == ""  # no progress bar: nothing built
    assert len(folders(tmp_path / "cache")) == 1 and folders(tmp_path / "cache")[0].startswith("toy-")


def test_a_changed_setting_or_file_builds_a_new_folder(tmp_path):
    files = write_files(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    decode_images(files, SIZE, "short_side", cache_dir, name="toy", console=QUIET)
    decode_images(files, (16, 16), "short_side", cache_dir, name="toy", console=QUIET)
    decode_images(files, SIZE, "stretch", cache_dir, name="toy", console=QUIET)
    assert len(folders(cache_dir)) == 3
    write_files(tmp_path / "images", seed=7)  # new bytes under the same names
    out = decode_images(files, SIZE, "short_side", cache_dir, name="toy", console=QUIET)
    assert len(folders(cache_dir)) == 4
    for i, path in enumerate(files.paths):
        assert torch.equal(out.images[i], reference(path, SIZE, "short_side"))
    relabelled = ImageList(files.paths, (0, 1, 2))
    out = decode_images(relabelled, SIZE, "short_side", cache_dir, name="toy", console=QUIET)
    assert out.labels.tolist() == [0, 1, 2]
    assert len(folders(cache_dir)) == 5


def test_files_with_a_rule_of_their_own_are_centred_on_zeros(tmp_path):
    files = write_files(tmp_path / "images")
    inner = (21, 25)  # offsets (24 - 21) / 2 = 1.5 -> 2 and (32 - 25) / 2 = 3.5 -> 4, rounded half to even
    own = {0: ("stretch", inner), 2: ("short_side", SIZE)}
    out = decode_images(files, SIZE, "short_side", tmp_path / "cache", name="toy", console=QUIET, own=own)
    expected = reference(files.paths[0], inner, "stretch")
    assert torch.equal(out.images[0, :, 2:23, 4:29], expected)
    assert torch.equal(augment.center_crop(out.images[:1], inner)[0], expected)  # the test view takes it back
    assert out.images[0].sum(dtype=torch.int64) == expected.sum(dtype=torch.int64)  # zeros around it
    for i in (1, 2):
        assert torch.equal(out.images[i], reference(files.paths[i], SIZE, "short_side"))
    with pytest.raises(ValueError, match="no larger than"):
        decode_images(files, SIZE, "short_side", tmp_path / "cache", name="toy", own={1: ("stretch", (25, 32))})


def test_files_own_rules_are_part_of_the_key(tmp_path):
    files = write_files(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    decode_images(files, SIZE, "short_side", cache_dir, name="toy", console=QUIET)
    decode_images(files, SIZE, "short_side", cache_dir, name="toy", console=QUIET, own={})
    assert len(folders(cache_dir)) == 1  # no own rules: the key of a cache made before they existed
    for own in [{0: ("stretch", SIZE)}, {0: ("stretch", (20, 30))}, {1: ("stretch", SIZE)}]:
        decode_images(files, SIZE, "short_side", cache_dir, name="toy", console=QUIET, own=own)
    assert len(folders(cache_dir)) == 4


def test_an_interrupted_build_leaves_no_folder_and_the_next_build_is_whole(tmp_path, monkeypatch):
    files = ImageList(tuple(write_files(tmp_path / "images").paths) * 4, (2, 0, 1) * 4)
    cache_dir = tmp_path / "cache"
    calls = []

    def failing_decode(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("the disk went away")
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_image", failing_decode)
    with pytest.raises(OSError, match="disk went away"):
        decode_images(files, SIZE, "stretch", cache_dir, name="toy", console=QUIET)
    assert folders(cache_dir) == []  # neither a final folder nor the temporary one
    monkeypatch.undo()
    out = decode_images(files, SIZE, "stretch", cache_dir, name="toy", console=QUIET)
    assert out.images.shape == (12, 3, *SIZE)
    for i, path in enumerate(files.paths):
        assert torch.equal(out.images[i], reference(path, SIZE, "stretch"))

    # a build killed outright leaves its temporary folder: the next build of that key removes it (its process is
    # gone) but not one whose process still runs (another build in progress)
    (name,) = folders(cache_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, running = cache_dir / f"{name}.tmp-{dead.pid}-0000", cache_dir / f"{name}.tmp-{os.getpid()}-1111"
    for folder in (stale, running):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"partial")
    (cache_dir / name / "images.npy").unlink()
    (cache_dir / name / "index.parquet").unlink()
    (cache_dir / name).rmdir()
    out = decode_images(files, SIZE, "stretch", cache_dir, name="toy", console=QUIET)
    assert folders(cache_dir) == [name, running.name]
    assert torch.equal(out.images[5], reference(files.paths[5], SIZE, "stretch"))


def test_a_missing_file_is_named(tmp_path):
    files = write_files(tmp_path / "images")
    missing = tmp_path / "images" / "gone.jpg"
    listed = ImageList((*files.paths, missing), (*files.labels, 0))
    with pytest.raises(ClrunError, match="listed by the dataset's index but not found") as error:
        decode_images(listed, SIZE, "stretch", tmp_path / "cache", name="toy", console=QUIET)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_a_corrupt_file_is_named_or_skipped(tmp_path, caplog):
    files = write_files(tmp_path / "images")
    corrupt = tmp_path / "images" / "broken.jpg"
    corrupt.write_bytes(torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    listed = ImageList((files.paths[0], corrupt, *files.paths[1:]), (2, 5, 0, 1))
    cache_dir = tmp_path / "cache"
    with pytest.raises(ClrunError, match="set data.skip_corrupt=true to skip such files") as error:
        decode_images(listed, SIZE, "stretch", cache_dir, name="toy", console=QUIET)
    assert str(corrupt) in str(error.value) and "Unsupported image file" in str(error.value)
    assert "\n" not in str(error.value) and "cpp" not in str(error.value)
    assert folders(cache_dir) == []

    with caplog.at_level(logging.WARNING, logger="clrun"):
        out = decode_images(listed, SIZE, "stretch", cache_dir, name="toy", skip_corrupt=True, console=QUIET)
    assert out.skipped == (corrupt,)
    assert out.kept.tolist() == [0, 2, 3] and out.labels.tolist() == [2, 0, 1] and len(out.images) == 3
    for row, index in enumerate(out.kept.tolist()):
        assert torch.equal(out.images[row], reference(listed.paths[index], SIZE, "stretch"))
    assert "1 image files" in caplog.text and str(corrupt) in caplog.text

    # the cache holds what was skipped: without skip_corrupt the same error, with it the same result
    with pytest.raises(ClrunError, match="Unsupported image file") as again:
        decode_images(listed, SIZE, "stretch", cache_dir, name="toy", console=QUIET)
    assert str(again.value) == str(error.value)
    hit = decode_images(listed, SIZE, "stretch", cache_dir, name="toy", skip_corrupt=True, console=QUIET)
    assert hit.skipped == (corrupt,) and torch.equal(hit.images, out.images) and len(folders(cache_dir)) == 1


def test_the_loser_of_a_race_to_build_uses_the_winners_folder(tmp_path, monkeypatch):
    files = write_files(tmp_path / "images")
    rename = os.rename

    def rival_first(source, target):  # another process finishes the same build just before this one renames
        monkeypatch.setattr(os, "rename", rename)
        decode_images(files, SIZE, "stretch", tmp_path / "cache", name="toy", console=QUIET)
        rename(source, target)

    monkeypatch.setattr(os, "rename", rival_first)
    out = decode_images(files, SIZE, "stretch", tmp_path / "cache", name="toy", console=QUIET)
    assert len(folders(tmp_path / "cache")) == 1  # the winner's; the loser's temporary folder is gone
    for i, path in enumerate(files.paths):
        assert torch.equal(out.images[i], reference(path, SIZE, "stretch"))
