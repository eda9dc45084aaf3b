"""The fine-grained readers (clrun.data.fine_grained) on small copies written in each release's exact on-disk
format, and the stream YAMLs that name them."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from conftest import IMAGE_RUN, clrun, compose_config, one_line_error, run_tables
from fixtures import write_image
from omegaconf import OmegaConf
from rich.console import Console
from torchvision.io import decode_image, encode_png
from torchvision.transforms.v2 import functional as F

from clrun.data import augment
from clrun.data.build import build_stream
from clrun.data.fine_grained import (
    CPG_FINE_GRAINED,
    read_cpg_fine_grained,
    read_cub200,
    read_flowers102,
    read_stanford_cars,
)

# ---- CPG's six datasets (Piggyback's prepared ImageFolder folders) -------------------------------------------------

# dataset -> split -> class folder -> image count; imagenet has no train folder, flowers' class names sort as strings
CPG_COPY = {
    "imagenet": {"val": {"n01440764": 2, "n01443537": 1}},
    "cubs_cropped": {"train": {"001.Black_footed_Albatross": 3, "002.Laysan_Albatross": 2}, "test": {}},
    "flowers": {"train": {"1": 1, "10": 2, "2": 1}, "test": {}},
}
CPG_COPY["cubs_cropped"]["test"] = {"001.Black_footed_Albatross": 1, "002.Laysan_Albatross": 2}
CPG_COPY["flowers"]["test"] = {"1": 2, "10": 1, "2": 1}


def write_cpg(root: Path, copy: dict = CPG_COPY) -> None:
    for dataset, splits in copy.items():
        for split, classes in splits.items():
            for name, count in classes.items():
                for k in range(count):
                    write_image(root / dataset / split / name / f"img_{k}.jpg", 30 * k)
                (root / dataset / split / name / "notes.txt").write_text("not an image")


def test_cpg_tasks_follow_the_datasets_order_and_sorted_class_folders(tmp_path):
    write_cpg(tmp_path)
    files = read_cpg_fine_grained(tmp_path, datasets=list(CPG_COPY))
    assert files.classes == (
        "imagenet/n01440764",
        "imagenet/n01443537",
        "cubs_cropped/001.Black_footed_Albatross",
        "cubs_cropped/002.Laysan_Albatross",
        "flowers/1",
        "flowers/10",
        "flowers/2",
    )
    assert [(t.name, t.classes, t.train, t.test) for t in files.tasks] == [
        ("imagenet", (0, 1), None, None),
        ("cubs_cropped", (2, 3), None, None),
        ("flowers", (4, 5, 6), None, None),
    ]
    assert files.official is None and files.train.boxes is None
    # imagenet's train folder is absent: its task has no training images; its val folder is its test split
    assert files.train.labels == (2, 2, 2, 3, 3, 4, 5, 5, 6)
    assert files.test.labels == (0, 0, 1, 2, 3, 3, 4, 4, 5, 6)
    assert files.test.paths[0] == tmp_path / "imagenet/val/n01440764/img_0.jpg"
    assert all(p.is_file() and p.suffix == ".jpg" for p in files.train.paths + files.test.paths)
    # the same files and labels as CPG's torchvision ImageFolder, offset by the datasets before
    folder = torchvision.datasets.ImageFolder(tmp_path / "flowers" / "train")
    assert [(Path(p), y + 4) for p, y in folder.samples] == list(
        zip(files.train.paths, files.train.labels, strict=True)
    )[-4:]


def test_cpg_reads_imagenet_train_when_present_and_a_folder_under_root(tmp_path):
    copy = {"imagenet": {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}}}
    write_cpg(tmp_path / "data", copy)
    files = read_cpg_fine_grained(tmp_path, datasets=["imagenet"], folder="data")
    assert (files.classes, files.train.labels, files.test.labels) == (("imagenet/a", "imagenet/b"), (0, 0, 1), (0, 1))


def test_cpg_default_order_is_cpgs():
    assert CPG_FINE_GRAINED == ("imagenet", "cubs_cropped", "stanford_cars_cropped", "flowers", "wikiart", "sketches")


def test_cpg_errors_name_the_folder_and_the_layout(tmp_path):
    write_cpg(tmp_path)
    message = one_line_error("not found", read_cpg_fine_grained, tmp_path)  # no stanford_cars_cropped
    assert str(tmp_path / "stanford_cars_cropped" / "test") in message
    assert "{train,test}/<class>/<image>" in message and "imagenet: val" in message
    write_cpg(tmp_path, {"wikiart": {"test": {"a": 1}}})
    one_line_error(f"{tmp_path / 'wikiart' / 'train'} not found", read_cpg_fine_grained, tmp_path, datasets=["wikiart"])
    write_cpg(tmp_path, {"sketches": {"train": {"a": 1, "b": 1}, "test": {"a": 1}}})
    one_line_error("different class folders", read_cpg_fine_grained, tmp_path, datasets=["sketches"])
    (tmp_path / "empty" / "test").mkdir(parents=True)
    (tmp_path / "empty" / "train").mkdir()
    one_line_error("holds no class folders", read_cpg_fine_grained, tmp_path, datasets=["empty"])
    one_line_error("each of CPG's dataset folders once", read_cpg_fine_grained, tmp_path, datasets=["flowers"] * 2)


# ---- CUB-200-2011 (the official release's index files) ----------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# image id -> (class id, is_training_image, box); image 6 is listed but absent from this copy
CUB_IMAGES = {
    1: (1, 1, (10.0, 20.0, 100.0, 80.5)),
    2: (1, 0, (0.0, 0.0, 20.0, 16.0)),
    3: (2, 1, (5.0, 6.0, 7.0, 8.0)),
    4: (3, 0, (1.0, 2.0, 3.0, 4.0)),
    5: (3, 1, (2.0, 3.0, 4.0, 5.0)),
    6: (2, 0, (3.0, 4.0, 5.0, 6.0)),
}


def write_cub(root: Path, absent: tuple[int, ...] = (6,)) -> Path:
    base = root / "CUB_200_2011"
    base.mkdir(parents=True)
    paths = {i: f"{CUB_CLASSES[c - 1]}/{CUB_CLASSES[c - 1][4:]}_{i:04d}.jpg" for i, (c, _, _) in CUB_IMAGES.items()}
    for i, path in paths.items():
        if i not in absent:
            write_image(base / "images" / path, 20 * i)
    lines = {
        "images.txt": [f"{i} {paths[i]}" for i in CUB_IMAGES],
        "image_class_labels.txt": [f"{i} {c}" for i, (c, _, _) in CUB_IMAGES.items()],
        "train_test_split.txt": [f"{i} {t}" for i, (_, t, _) in CUB_IMAGES.items()],
        "classes.txt": [f"{k} {name}" for k, name in enumerate(CUB_CLASSES, 1)],
        "bounding_boxes.txt": [f"{i} {' '.join(map(str, b))}" for i, (_, _, b) in CUB_IMAGES.items()],
    }
    for name, rows in lines.items():
        (base / name).write_text("\n".join(rows) + "\n")
    return base


def test_cub200_official_split_labels_and_class_order(tmp_path):
    base = write_cub(tmp_path)
    files = read_cub200(tmp_path)
    assert files.classes == tuple(CUB_CLASSES) and files.official == (5994, 5794) and files.tasks is None
    assert files.train.labels == (0, 1, 2) and files.test.labels == (0, 2)  # image 6 (absent) left out
    assert files.train.paths[0] == base / "images" / "001.Black_footed_Albatross" / "Black_footed_Albatross_0001.jpg"
    assert all(p.is_file() for p in files.train.paths + files.test.paths)
    assert files.train.boxes is None and files.test.boxes is None


def test_cub200_crop_returns_the_bounding_boxes(tmp_path):
    write_cub(tmp_path)
    files = read_cub200(tmp_path, crop=True)
    assert files.train.boxes == tuple(CUB_IMAGES[i][2] for i in (1, 3, 5))
    assert files.test.boxes == tuple(CUB_IMAGES[i][2] for i in (2, 4))


def test_cub200_errors_name_the_file_line_and_layout(tmp_path):
    base = write_cub(tmp_path)
    (base / "bounding_boxes.txt").unlink()
    read_cub200(tmp_path)  # the boxes are read only to crop
    message = one_line_error("bounding_boxes.txt not found", read_cub200, tmp_path, crop=True)
    assert "CUB-200-2011's layout CUB_200_2011/{images.txt," in message and "data.root" in message
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 yes\n")
    one_line_error(r"train_test_split.txt:3: malformed line '3 yes'", read_cub200, tmp_path)
    (base / "train_test_split.txt").write_text("1 1\n2 2\n")
    one_line_error(r"train_test_split.txt:2: .*2 outside 0..1", read_cub200, tmp_path)
    (base / "train_test_split.txt").write_text("1 1\n2 0\n")
    one_line_error("train_test_split.txt: no line for image id 3 of images.txt", read_cub200, tmp_path)
    (base / "image_class_labels.txt").write_text("1 4\n")
    one_line_error(r"image_class_labels.txt:1: .*4 outside 1..3", read_cub200, tmp_path)
    (base / "classes.txt").write_text("1 a\n3 b\n")
    one_line_error(r"classes.txt: class ids must be 1..2", read_cub200, tmp_path)
    (base / "images.txt").unlink()
    one_line_error(f"{base / 'images.txt'} not found", read_cub200, tmp_path)


# ---- Stanford Cars (torchvision's StanfordCars layout: the devkit's .mat files) ---------------------------------

CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
CARS_TRAIN = [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 1), ("00004.jpg", 2)]
CARS_TEST = [("00001.jpg", 2), ("00002.jpg", 3), ("00003.jpg", 1)]


def write_annotations(path: Path, rows: list[tuple[str, int]]) -> None:
    """A devkit annotations struct array (bbox_x1..bbox_y2, class, fname), as cars_train_annos.mat stores it."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, (fname, label) in enumerate(rows):
        records[0, k] = (np.uint8(1), np.uint8(2), np.uint8(18), np.uint8(14), np.uint8(label), fname)
    scipy.io.savemat(path, {"annotations": records})


def write_cars(root: Path) -> Path:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS_CLASSES], dtype=object)})
    write_annotations(base / "devkit" / "cars_train_annos.mat", CARS_TRAIN)
    write_annotations(base / "cars_test_annos_withlabels.mat", CARS_TEST)
    for folder, rows in (("cars_train", CARS_TRAIN), ("cars_test", CARS_TEST)):
        for k, (fname, _) in enumerate(rows):
            write_image(base / folder / fname, 40 * k)
    return base


def test_stanford_cars_official_split_and_devkit_class_order(tmp_path):
    base = write_cars(tmp_path)
    files = read_stanford_cars(tmp_path)
    assert files.classes == tuple(CARS_CLASSES) and files.official == (8144, 8041) and files.tasks is None
    assert files.train.labels == (2, 0, 0, 1) and files.test.labels == (1, 2, 0)
    assert files.train.paths == tuple(base / "cars_train" / f for f, _ in CARS_TRAIN)
    # torchvision's StanfordCars reads this copy the same way
    for split, listed in (("train", files.train), ("test", files.test)):
        cars = torchvision.datasets.StanfordCars(tmp_path, split=split)
        assert cars.classes == CARS_CLASSES
        assert [(Path(p), y) for p, y in cars._samples] == list(zip(listed.paths, listed.labels, strict=True))


def test_stanford_cars_partial_copy_and_errors(tmp_path):
    base = write_cars(tmp_path)
    (base / "cars_test" / "00002.jpg").unlink()
    assert read_stanford_cars(tmp_path).test.labels == (1, 0)
    write_annotations(base / "cars_test_annos_withlabels.mat", [("00001.jpg", 4)])
    one_line_error("class 4 outside 1..3", read_stanford_cars, tmp_path)
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"other": np.zeros(3)})
    one_line_error("no variable 'annotations'", read_stanford_cars, tmp_path)
    (base / "cars_test_annos_withlabels.mat").write_bytes(b"not a mat file")
    one_line_error("not a readable .mat file", read_stanford_cars, tmp_path)
    (base / "devkit" / "cars_meta.mat").unlink()
    message = one_line_error(f"{base / 'devkit' / 'cars_meta.mat'} not found", read_stanford_cars, tmp_path)
    assert "torchvision's StanfordCars layout stanford_cars/{devkit/cars_meta.mat," in message


# ---- Oxford 102 Flowers (torchvision's Flowers102 layout) --------------------------------------------------------

FLOWERS_LABELS = [1, 1, 2, 102, 2, 102, 1, 2]  # imagelabels.mat: 1-based class of image_00001.jpg ...
FLOWERS_SETS = {"trnid": [4, 1, 3], "valid": [7], "tstid": [2, 6, 8, 5]}  # image 5 is absent from this copy


def write_flowers(root: Path) -> Path:
    base = root / "flowers-102"
    for image_id in range(1, len(FLOWERS_LABELS) + 1):
        if image_id != 5:
            write_image(base / "jpg" / f"image_{image_id:05d}.jpg", 25 * image_id)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([FLOWERS_LABELS], dtype=np.uint8)})
    scipy.io.savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in FLOWERS_SETS.items()})
    return base


def test_flowers102_splits_labels_and_names(tmp_path):
    base = write_flowers(tmp_path)
    files = read_flowers102(tmp_path)
    assert len(files.classes) == 102 and files.classes[0] == "pink primrose" and files.classes[101] == "blackberry lily"
    assert files.official == (2040, 6149) and files.tasks is None
    assert files.train.paths == tuple(base / "jpg" / f"image_{i:05d}.jpg" for i in (4, 1, 3, 7))
    assert files.train.labels == (101, 0, 1, 0)
    assert files.test.labels == (0, 101, 1)  # image 5 (absent) left out
    only_train = read_flowers102(tmp_path, train_splits=["train"])
    assert only_train.official == (1020, 6149) and only_train.train.labels == (101, 0, 1)


def test_flowers102_errors(tmp_path):
    base = write_flowers(tmp_path)
    for wrong in (["test"], ["train", "train"], []):
        one_line_error("must name train and/or val", read_flowers102, tmp_path, train_splits=wrong)
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[9]]), "valid": np.array([[1]]), "tstid": 2})
    one_line_error("trnid: image id 9 outside 1..8", read_flowers102, tmp_path)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([[0, 103]])})
    one_line_error("labels outside 1..102", read_flowers102, tmp_path)
    (base / "setid.mat").unlink()
    message = one_line_error(f"{base / 'setid.mat'} not found", read_flowers102, tmp_path)
    assert "Flowers102 layout flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}" in message


# ---- the stream YAMLs ----------------------------------------------------------------------------------------------


def image_keys(stream) -> tuple:
    """The decode and augmentation keys of a stream config."""
    decode = (list(stream.image_size), stream.resize.value, list(stream.input_size))
    return (*decode, stream.augment, stream.crop.value, stream.flip, stream.cutout, stream.normalize.value)


def test_cpg_fine_grained_yaml(tmp_path):
    stream = compose_config("stream=cpg_fine_grained", f"data.root={tmp_path}").stream
    assert stream.dataset._target_ == "clrun.data.fine_grained.read_cpg_fine_grained"
    assert tuple(stream.dataset.datasets) == CPG_FINE_GRAINED and stream.dataset.folder == "."
    assert (stream.split.value, stream.scenario.value, stream.n_tasks) == ("release", "task", 6)
    assert image_keys(stream) == ([256, 256], "short_side", [224, 224], True, "resized", True, 16, "imagenet")
    cropped = {"resize": "stretch", "image_size": [224, 224], "crop": "none"}  # CPG's Resize((224, 224)), no crop
    views = OmegaConf.to_container(stream.task_views, resolve=True)
    assert views == {"cubs_cropped": cropped, "stanford_cars_cropped": cropped}


@pytest.mark.parametrize(
    "name,target,keys,tasks",
    [
        ("cub200", "read_cub200", {"crop": False, "folder": "CUB_200_2011"}, (10, 20)),
        ("flowers102", "read_flowers102", {"train_splits": ["train", "val"], "folder": "flowers-102"}, (10, 10)),
    ],
)
def test_task_incremental_yamls(tmp_path, name, target, keys, tasks):
    stream = compose_config(f"stream={name}", f"data.root={tmp_path}").stream
    dataset = {k: v for k, v in stream.dataset.items() if k != "_target_"}
    assert stream.dataset._target_ == f"clrun.data.fine_grained.{target}" and dataset == keys
    assert (stream.split.value, stream.scenario.value, stream.n_tasks, stream.classes_per_task) == (
        "contiguous",
        "task",
        *tasks,
    )
    assert image_keys(stream) == ([256, 256], "short_side", [224, 224], True, "resized", True, 0, "imagenet")


# ---- CPG's per-task recipe: the *_cropped sets resized straight to input_size (stream.task_views) -----------------

VIEWS_COPY = {
    "imagenet": {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}},
    "cubs_cropped": {"train": {"c": 2, "d": 1}, "test": {"c": 1, "d": 1}},
    "flowers": {"train": {"e": 2, "f": 1}, "test": {"e": 1, "f": 1}},
}
VIEWS_SIZES = ["stream.image_size=[24,24]", "stream.input_size=[15,17]"]  # centre offsets 4.5 -> 4 and 3.5 -> 4


def write_textured(root: Path, copy: dict = VIEWS_COPY) -> None:
    """Piggyback's layout with lossless random-pixel PNGs of differing sizes (so crops and resizes show)."""
    g = torch.Generator().manual_seed(0)
    for dataset, splits in copy.items():
        for split, classes in splits.items():
            for name, count in classes.items():
                for k in range(count):
                    height, width = (int(v) for v in torch.randint(20, 50, (2,), generator=g))
                    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
                    path = root / dataset / split / name / f"img_{k}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(encode_png(image).numpy().tobytes())


def views_stream(tmp_path, *overrides: str):
    """The cpg_fine_grained stream on VIEWS_COPY (imagenet, cubs_cropped, flowers), no flip, no Cutout."""
    datasets = "stream.dataset.datasets=[imagenet,cubs_cropped,flowers]"
    cfg = compose_config(
        "stream=cpg_fine_grained",
        f"data.root={tmp_path / 'data'}",
        f"data.cache={tmp_path / 'cache'}",
        datasets,
        "stream.n_tasks=3",
        "stream.flip=false",
        "stream.cutout=0",
        "~stream.task_views.stanford_cars_cropped",
        *VIEWS_SIZES,
        *overrides,
    )
    return build_stream(cfg.stream, cfg.data, 0, "cpu", Console(quiet=True))


def test_cropped_sets_take_cpgs_resize_and_the_others_the_random_crop(tmp_path):
    write_textured(tmp_path / "data")
    stream = views_stream(tmp_path)
    cubs, flowers = stream.tasks[1], stream.tasks[2]
    assert (cubs.name, flowers.name, stream.input_shape) == ("cubs_cropped", "flowers", (3, 15, 17))
    for split, folder in ((cubs.train, "train"), (cubs.test, "test")):
        paths = sorted((tmp_path / "data" / "cubs_cropped" / folder).rglob("*.png"))
        resized = torch.stack([F.resize(decode_image(str(p)), [15, 17], antialias=True) for p in paths])
        assert torch.equal(split.x[:, :, 4:19, 4:21], resized)  # CPG's Resize((15, 17)), centred on zeros
        assert split.x.sum(dtype=torch.int64) == resized.sum(dtype=torch.int64)
        expected = stream.prepare(resized, train=False, task=1)
        assert torch.equal(stream.prepare(split.x, train=True, task=1), expected)  # no random crop
        assert torch.equal(stream.prepare(split.x, train=False, task=1), expected)
    # flowers: RandomResizedCrop from its 24x24 short-side square, as the stream's one recipe says
    x = flowers.train.x
    assert x[:, :, :4].sum() > 0  # decoded to the whole 24x24
    torch.manual_seed(0)
    trained = stream.prepare(x, train=True, task=2)
    torch.manual_seed(0)
    boxes = augment.resized_crop_boxes(len(x), 24, 24, stream.view.scale, stream.view.ratio)
    assert torch.equal(trained, stream.prepare(augment.resized_crop(x, boxes, (15, 17)), train=False, task=2))
    assert not torch.equal(trained, stream.prepare(x, train=False, task=2))
    # a batch of several tasks (replay): each image through its task's view; an unknown task is refused
    mixed = torch.cat([cubs.train.x, x])
    tasks = torch.tensor([1] * len(cubs.train) + [2] * len(x))
    torch.manual_seed(0)
    out = stream.prepare(mixed, train=True, task=tasks)
    assert torch.equal(out[: len(cubs.train)], stream.prepare(cubs.train.x, train=False, task=1))
    assert out.shape == (len(mixed), 3, 15, 17)
    one_line_error("stream.task_views gives tasks their own", stream.prepare, mixed, train=True)
    assert stream.prepare(mixed, train=False).shape == out.shape  # the test view is every task's


def test_task_views_are_part_of_the_cache_key(tmp_path):
    write_textured(tmp_path / "data")
    train_folders = lambda: sorted((tmp_path / "cache").glob("cpg_fine_grained-train-*"))  # noqa: E731
    views_stream(tmp_path)
    views_stream(tmp_path, "stream.cutout=8")  # an augmentation key: the same decoded images
    assert len(train_folders()) == 1
    views_stream(tmp_path, "stream.task_views.cubs_cropped.image_size=[16,20]")
    views_stream(tmp_path, "stream.task_views=null")
    assert len(train_folders()) == 3


@pytest.mark.parametrize(
    "override,message",
    [
        ("+stream.task_views.cub_cropped={crop:none}", "stream.task_views.cub_cropped: the release has no task"),
        ("stream.task_views.cubs_cropped=3", "stream.task_views.cubs_cropped: expected a mapping"),
        ("+stream.task_views.cubs_cropped.rotate=3", "stream.task_views.cubs_cropped.rotate: not a per-task key"),
        ("stream.task_views.cubs_cropped.crop=sideways", "stream.task_views.cubs_cropped.crop: .*sideways"),
        ("+stream.task_views.cubs_cropped.cutout=-1", r"stream.task_views.cubs_cropped.cutout=-1 is invalid"),
        ("stream.task_views.cubs_cropped.image_size=[25,24]", r"image_size=\[25, 24\] must be \[H, W\] between"),
        ("stream.task_views.cubs_cropped.image_size=[14,17]", r"between stream.input_size \[15, 17\]"),
        ("stream.task_views.cubs_cropped.crop=resized", "cubs_cropped.crop=resized would crop the zero border"),
        ("stream.split=contiguous", "stream.task_views names tasks of a dataset's release"),
    ],
)
def test_task_view_errors_name_the_key(tmp_path, override, message):
    write_textured(tmp_path / "data")
    one_line_error(message, views_stream, tmp_path, override)


def test_a_dataset_left_out_with_its_task_view_is_named_through_the_cli(tmp_path):
    write_cpg(tmp_path / "data", CPG_E2E)
    overrides = ["stream=cpg_fine_grained", f"data.root={tmp_path / 'data'}", *IMAGE_RUN]
    failed = clrun(tmp_path, *overrides, "stream.dataset.datasets=[imagenet,cubs_cropped]")
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert "stream.task_views.stanford_cars_cropped: the release has no task" in " ".join(failed.stderr.split())
    assert "~stream.task_views.stanford_cars_cropped" in " ".join(failed.stderr.split())


# ---- end to end: 2-task streams through the clrun command --------------------------------------------------------

CPG_E2E = {
    "imagenet": {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}},
    "cubs_cropped": {"train": {"c": 2, "d": 2, "e": 1}, "test": {"c": 1, "d": 1, "e": 1}},
}
# stream, the copy's writer, overrides, the tasks' names and training image counts, the partial-copy warning
END_TO_END = [
    (
        "cpg_fine_grained",
        lambda root: write_cpg(root, CPG_E2E),
        ["stream.dataset.datasets=[imagenet,cubs_cropped]", "~stream.task_views.stanford_cars_cropped"],
        [("imagenet", 3), ("cubs_cropped", 5)],
        None,
    ),
    (
        "cub200",
        lambda root: write_cub(root, absent=()),
        ["stream.classes_per_task=1", "stream.dataset.crop=true"],
        [("0", 1), ("1", 1)],
        "3 of the official 5994 training images",
    ),
    (
        "flowers102",
        write_flowers,
        ["stream.classes_per_task=1"],
        [("0", 2), ("1", 1)],
        "4 of the official 2040 training images",
    ),
    (
        "cub200",
        write_cars,
        [
            "stream.classes_per_task=1",
            "~stream.dataset.crop",
            "stream.dataset.folder=stanford_cars",
            "stream.dataset._target_=clrun.data.fine_grained.read_stanford_cars",
        ],
        [("0", 2), ("1", 1)],
        "4 of the official 8144 training images",
    ),
]


@pytest.mark.parametrize("stream,write,overrides,tasks,warning", END_TO_END, ids=["cpg", "cub", "flowers", "cars"])
def test_two_task_stream_through_the_cli(tmp_path, stream, write, overrides, tasks, warning):
    write(tmp_path / "data")
    result = clrun(tmp_path, f"stream={stream}", f"data.root={tmp_path / 'data'}", *IMAGE_RUN, *overrides)
    assert result.returncode == 0, result.stderr
    task_rows, accuracy = run_tables(tmp_path)
    assert list(zip(task_rows["name"], task_rows["n_train"], strict=True)) == tasks
    assert accuracy["eval_task_name"].tolist() == [tasks[0][0], tasks[0][0], tasks[1][0]]
    if warning is not None:
        assert warning in " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
