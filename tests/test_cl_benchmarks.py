"""The continual-learning benchmark readers (clrun.data.cl_benchmarks) on small copies written in each release's exact
on-disk format (TinyImageNet-200, MiniImageNet's csvs and pickled cache, CORe50's 128x128 images and batch
filelists), and the stream YAMLs that name them."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import IMAGE_RUN, clrun, compose_config, one_line_error, run_tables
from fixtures import write_image

from clrun.data.cl_benchmarks import (
    CORE50_OBJECTS,
    read_core50,
    read_mini_imagenet,
    read_mini_imagenet_pickle,
    read_tiny_imagenet,
)

# ---- TinyImageNet-200 (the official tiny-imagenet-200.zip) ---------------------------------------------------------

TINY_WNIDS = ["n02124075", "n01443537", "n09428293"]  # wnids.txt's order, not sorted
TINY_WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n04067472": "reel"}
TINY_VAL = [("val_0.JPEG", "n09428293"), ("val_1.JPEG", "n02124075"), ("val_2.JPEG", "n01443537")]
TINY_VAL += [("val_3.JPEG", "n02124075")]


def write_tiny(root: Path, per_class: int = 3) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_WNIDS))
    (base / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in TINY_WORDS.items()))
    for wnid in TINY_WNIDS:
        for k in (10, 2, 0)[:per_class]:  # written out of order: the reader sorts by name
            write_image(base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", 20 * k)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    lines = []
    for k, (name, wnid) in enumerate(TINY_VAL):
        write_image(base / "val" / "images" / name, 50 * k)
        lines.append(f"{name}\t{wnid}\t{k}\t{k + 1}\t40\t50\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    write_image(base / "test" / "images" / "test_0.JPEG")  # the unlabelled test split: not read
    return base


def test_tiny_imagenet_classes_follow_wnids_txt_and_val_is_the_test_split(tmp_path):
    base = write_tiny(tmp_path)
    files = read_tiny_imagenet(tmp_path)
    assert files.classes == ("Egyptian cat", "goldfish", "n09428293")  # words.txt's first names, else the wnid
    assert files.official == (100_000, 10_000) and files.tasks is None and files.train.boxes is None
    expected = [base / "train" / w / "images" / f"{w}_{k}.JPEG" for w in TINY_WNIDS for k in (0, 10, 2)]
    assert list(files.train.paths) == expected
    assert files.train.labels == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert [p.name for p in files.test.paths] == [name for name, _ in TINY_VAL]
    assert files.test.labels == (2, 0, 1, 0)
    assert all(p.is_file() for p in files.train.paths + files.test.paths)


def test_tiny_imagenet_partial_copy_loads_and_words_txt_is_optional(tmp_path):
    base = write_tiny(tmp_path)
    (base / "val" / "images" / "val_1.JPEG").unlink()
    (base / "words.txt").unlink()
    (base / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_2.JPEG").unlink()
    files = read_tiny_imagenet(tmp_path)
    assert files.classes == tuple(TINY_WNIDS)
    assert files.train.labels == (0, 0, 0, 1, 1, 2, 2, 2) and files.test.labels == (2, 1, 0)
    assert files.official == (100_000, 10_000)  # the builder warns: fewer than the official release


def test_tiny_imagenet_errors_name_the_file_and_the_layout(tmp_path):
    base = write_tiny(tmp_path)
    annotations = base / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn09428293\t0\t0\t1\t1\nval_1.JPEG n02124075 0 0 1 1\n")
    one_line_error(f"{annotations}:2: expected", read_tiny_imagenet, tmp_path)
    annotations.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    one_line_error(f"{annotations}:1: .*found 'val_0.JPEG", read_tiny_imagenet, tmp_path)
    annotations.unlink()
    one_line_error(f"{annotations} not found", read_tiny_imagenet, tmp_path)
    (base / "wnids.txt").write_text("n01443537\nn01443537\n")
    one_line_error("a wnid is listed twice", read_tiny_imagenet, tmp_path)
    message = one_line_error(
        f"{tmp_path / 'elsewhere' / 'wnids.txt'} not found", read_tiny_imagenet, tmp_path, "elsewhere"
    )
    assert "TinyImageNet's layout elsewhere/{wnids.txt,train/<wnid>/images/*.JPEG," in message
    assert message.endswith("set data.root to the folder holding elsewhere")
    (base / "wnids.txt").write_text("n00000001\n")
    one_line_error(f"{base / 'train'} holds no images", read_tiny_imagenet, tmp_path)


# ---- MiniImageNet (images/ + the few-shot csvs, and the pickled cache) ---------------------------------------------

# csv -> its classes (600 images each in the release; 6 here), in the order they appear in the csv
MINI_CSVS = {"train": ["n03017168", "n01532829"], "val": ["n01855672"], "test": ["n01930112"]}
MINI_ORDER = ["n03017168", "n01532829", "n01855672", "n01930112"]
MINI_PER_CLASS = 6


def mini_file(wnid: str, k: int) -> str:
    return f"{wnid}{k + 1:08d}.jpg"


def write_mini(root: Path) -> Path:
    base = root / "miniImageNet"
    for csv, wnids in MINI_CSVS.items():
        rows = [(mini_file(w, k), w) for k in range(MINI_PER_CLASS) for w in wnids]  # classes interleaved
        for name, wnid in rows:
            write_image(base / "images" / name, MINI_ORDER.index(wnid) * 40)
        (base / f"{csv}.csv").write_text("filename,label\n" + "".join(f"{n},{w}\n" for n, w in rows))
    return base


def write_mini_cache(root: Path) -> Path:
    """The pickled cache of write_mini's copy: each class's images in csv order, pixel value 10 * label + k."""
    base = root / "miniImageNet"
    base.mkdir(parents=True, exist_ok=True)
    for csv, wnids in MINI_CSVS.items():
        images, class_dict = [], {}
        for wnid in wnids:
            label = MINI_ORDER.index(wnid)
            class_dict[wnid] = list(range(len(images), len(images) + MINI_PER_CLASS))
            images += [np.full((16, 16, 3), 10 * label + k, np.uint8) for k in range(MINI_PER_CLASS)]
        reordered = dict(reversed(class_dict.items()))  # the dict's order is not the class order: the indices are
        with (base / f"mini-imagenet-cache-{csv}.pkl").open("wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": reordered}, f)
    return base


def test_mini_imagenet_classes_in_csv_order_and_each_class_cut_in_order(tmp_path):
    base = write_mini(tmp_path)
    files = read_mini_imagenet(tmp_path, train_per_class=4)
    assert files.classes == tuple(MINI_ORDER) and files.tasks is None
    assert files.official == (400, 59_600)  # the release's 100 classes x (4, 600 - 4)
    for split, ks in ((files.train, range(4)), (files.test, range(4, 6))):
        by_label = {}
        for path, label in zip(split.paths, split.labels, strict=True):
            by_label.setdefault(label, []).append(path)
        assert by_label == {i: [base / "images" / mini_file(w, k) for k in ks] for i, w in enumerate(MINI_ORDER)}
    assert read_mini_imagenet(tmp_path).official == (50_000, 10_000)


def test_mini_imagenet_partial_copy_keeps_the_cut_of_the_csvs(tmp_path):
    base = write_mini(tmp_path)
    (base / "images" / mini_file(MINI_ORDER[0], 0)).unlink()
    files = read_mini_imagenet(tmp_path, train_per_class=4)
    assert files.train.labels.count(0) == 3 and files.test.labels.count(0) == 2  # the cut is by csv position


def test_mini_imagenet_pickle_matches_the_file_reader(tmp_path):
    write_mini_cache(tmp_path)
    x_train, y_train = read_mini_imagenet_pickle(tmp_path, train=True, train_per_class=4)
    x_test, y_test = read_mini_imagenet_pickle(tmp_path, train=False, train_per_class=4)
    assert x_train.dtype == torch.uint8 and x_train.shape == (16, 3, 16, 16) and y_train.dtype == torch.int64
    assert y_train.tolist() == [c for c in range(4) for _ in range(4)]
    assert y_test.tolist() == [c for c in range(4) for _ in range(2)]
    assert x_train[:, 0, 0, 0].tolist() == [10 * c + k for c in range(4) for k in range(4)]
    assert x_test[:, 1, 4, 3].tolist() == [10 * c + k for c in range(4) for k in range(4, 6)]
    write_mini(tmp_path)
    files = read_mini_imagenet(tmp_path, train_per_class=4)
    assert list(files.train.labels) == y_train.tolist() and list(files.test.labels) == y_test.tolist()


def test_mini_imagenet_errors_name_the_file_and_the_layout(tmp_path):
    base = write_mini(tmp_path)
    one_line_error("train_per_class=600: expected 1..599", read_mini_imagenet, tmp_path, train_per_class=600)
    (base / "val.csv").write_text("filename,label\nn0185567200000001.jpg\n")
    one_line_error(f"{base / 'val.csv'}:2: expected '<file name>,<wnid>'", read_mini_imagenet, tmp_path)
    (base / "val.csv").write_text("name,class\n")
    one_line_error(f"{base / 'val.csv'}:1: expected the header 'filename,label'", read_mini_imagenet, tmp_path)
    (base / "val.csv").write_text("filename,label\n")
    (base / "test.csv").unlink()
    message = one_line_error(f"{base / 'test.csv'} not found", read_mini_imagenet, tmp_path)
    assert "MiniImageNet's layout miniImageNet/{images/*.jpg,train.csv,val.csv,test.csv}" in message
    cache = base / "mini-imagenet-cache-train.pkl"
    message = one_line_error(f"{cache} not found", read_mini_imagenet_pickle, tmp_path, train=True)
    assert "mini-imagenet-cache-{train,val,test}.pkl" in message
    cache.write_bytes(b"not a pickle")
    one_line_error(f"{cache}: not a readable pickle", read_mini_imagenet_pickle, tmp_path, train=True)
    with cache.open("wb") as f:
        pickle.dump({"image_data": np.zeros((2, 4, 4), np.uint8), "class_dict": {}}, f)
    one_line_error("'image_data' must be a uint8 array", read_mini_imagenet_pickle, tmp_path, train=True)
    with cache.open("wb") as f:
        pickle.dump({"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"n1": [0, 2]}}, f)
    one_line_error("image indices outside 0..1", read_mini_imagenet_pickle, tmp_path, train=True)


# ---- CORe50 (core50_128x128.zip and the official batches_filelists.zip) -------------------------------------------

CORE50_TRAIN_SESSIONS = [1, 2, 4, 5, 6, 8, 9, 11]
CORE50_TEST_SESSIONS = [3, 7, 10]
NC_RUN0 = np.random.default_rng(0).permutation(50).tolist()  # run 0's object order: batch 0 has 10, the others 5
NC_BATCHES = [NC_RUN0[:10]] + [NC_RUN0[10 + 5 * k : 15 + 5 * k] for k in range(8)]
NI_RUN0 = [5, 1, 11, 2, 8, 4, 9, 6]  # run 0's session order


def core50_file(session: int, obj: int, frame: int = 0) -> str:
    """An image's path under core50_128x128, as the filelists write it (object id `obj` 0..49 is o<obj + 1>)."""
    return f"s{session}/o{obj + 1}/C_{session:02d}_{obj + 1:02d}_{frame:03d}.png"


def write_core50(root: Path) -> Path:
    base = root / "core50"
    for session in CORE50_TRAIN_SESSIONS + CORE50_TEST_SESSIONS:
        for obj in range(50):
            write_image(base / "core50_128x128" / core50_file(session, obj), 5 * obj)
    test = [(s, o) for s in CORE50_TEST_SESSIONS for o in range(50)]
    scenarios = {
        "NC_inc": [[(s, o) for o in objects for s in CORE50_TRAIN_SESSIONS] for objects in NC_BATCHES],
        "NI_inc": [[(s, o) for o in range(50)] for s in NI_RUN0],
    }
    for folder, batches in scenarios.items():
        lists = base / "batches_filelists" / folder / "run0"
        lists.mkdir(parents=True)
        for k, batch in enumerate(batches):
            (lists / f"train_batch_{k:02d}_filelist.txt").write_text(filelist(batch))
        (lists / "test_filelist.txt").write_text(filelist(test))
    return base


def filelist(entries: list[tuple[int, int]]) -> str:
    return "".join(f"{core50_file(s, o)} {o}\n" for s, o in entries)


def test_core50_nc_tasks_are_the_release_batches_of_new_objects(tmp_path):
    base = write_core50(tmp_path)
    files = read_core50(tmp_path, scenario="nc")
    assert files.classes == CORE50_OBJECTS and files.classes[:6] == (
        *(f"plug_adapter{i}" for i in range(1, 6)),
        "mobile_phone1",
    )
    assert files.official == (400, 150) and (len(files.train), len(files.test)) == (400, 150)
    assert [task.name for task in files.tasks] == [f"batch{k:02d}" for k in range(9)]
    assert [task.classes for task in files.tasks] == [tuple(sorted(objects)) for objects in NC_BATCHES]
    for task, objects in zip(files.tasks, NC_BATCHES, strict=True):
        assert task.test is None  # its objects' test images
        assert len(task.train) == 8 * len(objects)
        assert [files.train.labels[i] for i in task.train] == [o for o in objects for _ in CORE50_TRAIN_SESSIONS]
    first = files.tasks[0].train[0]
    assert files.train.paths[first] == base / "core50_128x128" / core50_file(1, NC_BATCHES[0][0])
    assert files.test.labels == tuple(o for _ in CORE50_TEST_SESSIONS for o in range(50))


def test_core50_ni_tasks_are_sessions_of_all_objects_tested_on_the_whole_test_set(tmp_path):
    write_core50(tmp_path)
    files = read_core50(tmp_path, scenario="ni")
    assert len(files.tasks) == 8 and all(task.classes == tuple(range(50)) for task in files.tasks)
    assert all(task.test is None for task in files.tasks)  # every test image: all 50 objects
    for task, session in zip(files.tasks, NI_RUN0, strict=True):
        assert {files.train.paths[i].parts[-3] for i in task.train} == {f"s{session}"}
        assert [files.train.labels[i] for i in task.train] == list(range(50))
    assert {p.parts[-3] for p in files.test.paths} == {"s3", "s7", "s10"}


def test_core50_partial_copy_keeps_the_official_counts_of_the_filelists(tmp_path):
    base = write_core50(tmp_path)
    (base / "core50_128x128" / core50_file(NI_RUN0[1], 7)).unlink()
    (base / "core50_128x128" / core50_file(3, 0)).unlink()
    files = read_core50(tmp_path, scenario="ni")
    assert files.official == (400, 150) and (len(files.train), len(files.test)) == (399, 149)
    assert [len(task.train) for task in files.tasks] == [50, 49, 50, 50, 50, 50, 50, 50]
    assert [files.train.labels[i] for i in files.tasks[2].train] == list(range(50))  # later indices still right


def test_core50_errors_name_the_file_and_the_layout(tmp_path):
    base = write_core50(tmp_path)
    one_line_error("scenario='nic': expected one of CORe50's scenarios nc, ni", read_core50, tmp_path, "nic")
    lists = base / "batches_filelists" / "NC_inc" / "run0"
    (lists / "train_batch_03_filelist.txt").write_text(f"{core50_file(1, 0)} 0\n{core50_file(1, 1)} 50\n")
    one_line_error(f"{lists / 'train_batch_03_filelist.txt'}:2: expected", read_core50, tmp_path)
    (lists / "train_batch_03_filelist.txt").write_text(f"{core50_file(1, 0)}\n")
    one_line_error("train_batch_03_filelist.txt:1: .*object id 0..49", read_core50, tmp_path)
    missing = base / "batches_filelists" / "NC_inc" / "run1" / "train_batch_00_filelist.txt"
    message = one_line_error(f"{missing} not found", read_core50, tmp_path, run=1)
    assert "CORe50's layout core50/{core50_128x128/s<k>/o<k>/" in message and "NC_inc|NI_inc" in message
    message = one_line_error(f"{tmp_path / 'core50_128x128'} not found", read_core50, tmp_path, folder=".")
    assert message.endswith("set data.root to the folder holding .")


# ---- the stream YAMLs ----------------------------------------------------------------------------------------------


def stream_keys(stream) -> tuple:
    return (
        stream.split.value,
        stream.scenario.value,
        stream.n_tasks,
        stream.classes_per_task,
        list(stream.image_size),
        stream.resize.value,
        stream.input_size,
        stream.augment,
        stream.normalize.value,
    )


def test_tiny_imagenet_yaml(tmp_path):
    stream = compose_config("stream=tiny_imagenet_10", f"data.root={tmp_path}").stream
    assert dict(stream.dataset) == {
        "_target_": "clrun.data.cl_benchmarks.read_tiny_imagenet",
        "folder": "tiny-imagenet-200",
    }
    assert stream_keys(stream) == ("contiguous", "task", 10, 20, [64, 64], "stretch", None, False, "imagenet")


def test_mini_imagenet_yaml_and_its_pickle_variant(tmp_path):
    stream = compose_config("stream=mini_imagenet_20", f"data.root={tmp_path}").stream
    assert dict(stream.dataset) == {
        "_target_": "clrun.data.cl_benchmarks.read_mini_imagenet",
        "folder": "miniImageNet",
        "train_per_class": 500,
    }
    assert stream_keys(stream) == ("contiguous", "task", 20, 5, [84, 84], "stretch", None, False, "imagenet")
    target = "clrun.data.cl_benchmarks.read_mini_imagenet_pickle"
    stream = compose_config("stream=mini_imagenet_20", f"stream.dataset._target_={target}").stream
    assert stream.dataset._target_ == target and stream.dataset.folder == "miniImageNet"


@pytest.mark.parametrize(
    "name,scenario,keys",
    [
        ("core50_nc", "nc", ("release", "task", 9, 5)),
        ("core50_ni", "ni", ("release", "domain", 8, 50)),
    ],
)
def test_core50_yamls(tmp_path, name, scenario, keys):
    stream = compose_config(f"stream={name}", f"data.root={tmp_path}").stream
    assert dict(stream.dataset) == {
        "_target_": "clrun.data.cl_benchmarks.read_core50",
        "scenario": scenario,
        "run": 0,
        "folder": "core50",
    }
    assert stream_keys(stream) == (*keys, [128, 128], "stretch", None, True, "imagenet")
    assert (stream.crop.value, stream.flip, stream.cutout) == ("none", True, 0)


# ---- end to end: 2-task streams through the CLI ---------------------------------------------------------------------


def test_tiny_imagenet_and_core50_streams_run_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_tiny(data)
    write_core50(data)
    streams = "stream=tiny_imagenet_10,core50_nc,core50_ni"
    done = clrun(tmp_path, "-m", streams, f"data.root={data}", "stream.classes_per_task=1", *IMAGE_RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    tasks, accuracy = run_tables(tmp_path, "finetune-tiny_imagenet_10-*")  # classes 0 and 1 of wnids.txt
    assert (tasks.name.tolist(), tasks.n_train.tolist()) == (["0", "1"], [3, 3])
    assert accuracy.groupby("eval_task").n_samples.first().tolist() == [2, 1]
    tasks, accuracy = run_tables(tmp_path, "finetune-core50_nc-*")  # the release's first 2 batches: 10 objects, then 5
    assert (tasks.name.tolist(), tasks.n_train.tolist()) == (["batch00", "batch01"], [80, 40])
    assert accuracy.groupby("eval_task").n_samples.first().tolist() == [30, 15]
    tasks, accuracy = run_tables(tmp_path, "finetune-core50_ni-*")  # 2 sessions of 50 objects, each tested on all 150
    assert (tasks.name.tolist(), tasks.n_train.tolist()) == (["batch00", "batch01"], [50, 50])
    assert set(accuracy.eval_mode) == {"task_agnostic"} and set(accuracy.n_samples) == {150}


def test_mini_imagenet_files_and_pickle_run_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_mini(data)
    write_mini_cache(data)
    targets = ",".join(f"clrun.data.cl_benchmarks.{r}" for r in ("read_mini_imagenet", "read_mini_imagenet_pickle"))
    overrides = [f"stream.dataset._target_={targets}", "stream.dataset.train_per_class=4", "stream.classes_per_task=2"]
    done = clrun(tmp_path, "-m", "stream=mini_imagenet_20", f"data.root={data}", *overrides, *IMAGE_RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "runs").glob("finetune-mini_imagenet_20-*"))
    assert len(runs) == 2
    for run_dir in runs:  # the same tasks from the files and from the pickled cache
        tasks = pd.read_parquet(run_dir / "tasks.parquet")
        accuracy = pd.read_parquet(run_dir / "accuracy.parquet")
        assert (tasks.name.tolist(), tasks.n_train.tolist()) == (["0-1", "2-3"], [8, 8])
        assert accuracy.groupby("eval_task").n_samples.first().tolist() == [4, 4]


def test_a_corrupt_image_stops_the_run_in_one_line_or_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    base = write_tiny(data)
    corrupt = base / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_2.JPEG"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a truncated JPEG
    stream = ["stream=tiny_imagenet_10", f"data.root={data}", "stream.classes_per_task=1"]
    failed = clrun(tmp_path, *stream, *IMAGE_RUN)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    error = "".join(failed.stderr.split())  # rich wraps long lines, even within words
    assert f"{corrupt}:cannotbedecoded" in error and "data.skip_corrupt=true" in error
    assert not list((tmp_path / "outputs").rglob("summary.parquet"))
    done = clrun(tmp_path, *stream, *IMAGE_RUN, "data.skip_corrupt=true")
    assert done.returncode == 0, done.stderr
    warning = f"1 image files could not be decoded and were skipped; the first: {corrupt}"
    assert "".join(warning.split()) in "".join((done.stdout + done.stderr).split())
    tasks, _ = run_tables(tmp_path)
    assert (tasks.n_train.tolist(), tasks.skipped_files.tolist()) == ([3, 2], [0, 1])
