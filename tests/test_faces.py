"""The face readers (clrun.data.faces) on small copies written in each release's exact on-disk format: CPG's task
folders, Adience's fold files and aligned faces, LFW's pairs.txt; and the cpg_faces stream YAML."""

import logging
from pathlib import Path

from conftest import IMAGE_RUN, clrun, compose_config, one_line_error, run_tables
from fixtures import write_image

from clrun.data.faces import (
    ADIENCE_AGES,
    FacePair,
    read_adience_age,
    read_adience_gender,
    read_cpg_faces,
    read_lfw_pairs,
)

# ---- CPG's task folders ------------------------------------------------------------------------------------------

# task -> split -> class folder -> image count; class folders are written out of order to check the sorting
CPG_COPY = {
    "face_verification": {"train": {"n002": 2, "n001": 3}, "val": {"n001": 1, "n002": 1}},
    "gender": {"train": {"2": 1, "0": 2, "1": 2}, "val": {"0": 1, "1": 1}},  # no val images of class 2
    "emotion": {"train": {"sad": 1, "happy": 2}, "val": {"happy": 1, "sad": 2}},
    "age0": {"train": {"0": 2, "1": 1}, "val": {"0": 1, "1": 1}},
}


def write_cpg_faces(root: Path, folder: str = "face_data") -> None:
    """CPG's face folders: <folder>/<task>/{train,val}/<class>/<n>.jpg, plus a PNG in a subfolder (ImageFolder
    walks them) and a text file it ignores."""
    for task, splits in CPG_COPY.items():
        for split, classes in splits.items():
            for name, count in classes.items():
                for i in range(count):
                    write_image(root / folder / task / split / name / f"{i}.jpg", 10 * i)
    write_image(root / folder / "emotion" / "train" / "happy" / "more" / "2.png")
    (root / folder / "emotion" / "train" / "happy" / "notes.txt").write_text("not an image")


def test_read_cpg_faces(tmp_path):
    write_cpg_faces(tmp_path)
    files = read_cpg_faces(tmp_path)
    assert files.classes == (
        "face_verification/n001",
        "face_verification/n002",
        "gender/0",
        "gender/1",
        "gender/2",
        "emotion/happy",
        "emotion/sad",
        "age0/0",
        "age0/1",
    )
    assert [(t.name, t.classes, t.train, t.test) for t in files.tasks] == [
        ("face_verification", (0, 1), None, None),
        ("gender", (2, 3, 4), None, None),
        ("emotion", (5, 6), None, None),
        ("age0", (7, 8), None, None),
    ]
    assert files.official is None and files.train.boxes is None
    base = tmp_path / "face_data"
    for split, images in (("train", files.train), ("val", files.test)):
        expected, label = [], 0
        for task, splits in CPG_COPY.items():
            for name in sorted(splits["train"]):
                count = splits[split].get(name, 0)
                expected += [(base / task / split / name / f"{i}.jpg", label) for i in range(count)]
                if (task, split, name) == ("emotion", "train", "happy"):
                    expected.append((base / task / split / name / "more" / "2.png", label))
                label += 1
        assert list(zip(images.paths, images.labels, strict=True)) == expected
    assert (len(files.train), len(files.test)) == (17, 9)


def test_read_cpg_faces_a_subset_of_tasks_in_another_order(tmp_path):
    write_cpg_faces(tmp_path, folder="data")
    files = read_cpg_faces(tmp_path, tasks=["age0", "gender"], folder="data")
    assert files.classes == ("age0/0", "age0/1", "gender/0", "gender/1", "gender/2")
    assert [(t.name, t.classes) for t in files.tasks] == [("age0", (0, 1)), ("gender", (2, 3, 4))]
    assert files.train.labels == (0, 0, 1, 2, 2, 3, 3, 4) and files.test.labels == (0, 1, 2, 3)


def test_read_cpg_faces_errors(tmp_path):
    message = one_line_error("face_data/face_verification/train not found", read_cpg_faces, tmp_path)
    assert "face_data/<task>/{train,val}/<class>/<image>" in message and "data.root" in message
    write_cpg_faces(tmp_path)
    one_line_error("must be a list of distinct", read_cpg_faces, tmp_path, tasks="gender")
    one_line_error("must be a list of distinct", read_cpg_faces, tmp_path, tasks=["gender", "gender"])
    one_line_error("face_data/age1/train not found", read_cpg_faces, tmp_path, tasks=["gender", "age1"])
    # CPG's face_verification/val is LFW: identities the training split does not have
    write_image(tmp_path / "face_data" / "face_verification" / "val" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    message = one_line_error("Aaron_Eckhart: 1 val class folders have no train folder", read_cpg_faces, tmp_path)
    assert "LFW" in message and "stream.dataset.tasks" in message
    (tmp_path / "face_data" / "gender" / "train" / "3").mkdir()
    one_line_error(r"gender/train/3 holds no image files \(.jpg", read_cpg_faces, tmp_path, tasks=["gender"])
    (tmp_path / "face_data" / "age0" / "val" / "0" / "0.jpg").unlink()
    (tmp_path / "face_data" / "age0" / "val" / "0").rmdir()
    (tmp_path / "face_data" / "age0" / "val" / "1" / "0.jpg").unlink()
    (tmp_path / "face_data" / "age0" / "val" / "1").rmdir()
    one_line_error("age0/val holds no class folders", read_cpg_faces, tmp_path, tasks=["age0"])


# ---- Adience -----------------------------------------------------------------------------------------------------

ADIENCE_HEADER = (
    "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"
)
# per fold: (user_id, original_image, face_id, age, gender); the image of the row marked MISSING is not written
MISSING = "missing_o.jpg"
ADIENCE_ROWS = [
    [
        ("u0", "a_o.jpg", "1", "(25, 32)", "f"),
        ("u0", "b_o.jpg", "2", "(0, 2)", "m"),
        ("u1", "c_o.jpg", "3", "None", ""),
    ],
    [("u2", "d_o.jpg", "4", "(60, 100)", "u"), ("u2", "e_o.jpg", "5", "35", "m")],
    [("u3", "f_o.jpg", "6", "(8, 12)", "m"), ("u3", MISSING, "7", "(4, 6)", "f")],
    [("u4", "g_o.jpg", "8", "(38, 43)", "f")],
    [("u5", "h_o.jpg", "9", "(48, 53)", "m"), ("u5", "i_o.jpg", "10", "(15, 20)", "f")],
]


def write_adience(root: Path) -> Path:
    """Adience's fold_<k>_data.txt files and aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>."""
    base = root / "adience"
    base.mkdir(parents=True)
    for k, rows in enumerate(ADIENCE_ROWS):
        lines = [ADIENCE_HEADER] + ["\t".join([*row, "0", "0", "816", "816", "0", "0", "55"]) for row in rows]
        (base / f"fold_{k}_data.txt").write_text("\n".join(lines) + "\n")
        for user, image, face, _, _ in rows:
            if image != MISSING:
                write_image(base / "aligned" / user / f"landmark_aligned_face.{face}.{image}")
    return base


def aligned(base: Path, user: str, face: str, image: str) -> Path:
    return base / "aligned" / user / f"landmark_aligned_face.{face}.{image}"


def test_read_adience_age(tmp_path, caplog):
    base = write_adience(tmp_path)
    with caplog.at_level(logging.INFO, logger="clrun"):
        files = read_adience_age(tmp_path, fold=2)
    assert files.classes == ADIENCE_AGES and files.tasks is None
    assert files.test.paths == (aligned(base, "u3", "6", "f_o.jpg"),) and files.test.labels == (2,)
    kept = [("u0", "1", "a_o.jpg"), ("u0", "2", "b_o.jpg"), ("u2", "4", "d_o.jpg"), ("u4", "8", "g_o.jpg")]
    kept += [("u5", "9", "h_o.jpg"), ("u5", "10", "i_o.jpg")]
    assert files.train.paths == tuple(aligned(base, *row) for row in kept)
    assert files.train.labels == (4, 0, 7, 5, 6, 3)
    assert files.official == (6, 2)  # the rows labelled with one of the eight groups; one image is missing
    assert "2 rows skipped, their age is not a class ('None' x1, '35' x1)" in caplog.text
    assert f"1 images the fold files list are missing (first: {aligned(base, 'u3', '7', MISSING)})" in caplog.text


def test_read_adience_gender(tmp_path, caplog):
    write_adience(tmp_path)
    with caplog.at_level(logging.INFO, logger="clrun"):
        files = read_adience_gender(tmp_path)  # fold 0 is the test split
    assert files.classes == ("f", "m")
    assert files.test.labels == (0, 1) and files.train.labels == (1, 1, 0, 1, 0)
    assert files.official == (6, 2)
    assert "2 rows skipped, their gender is not a class ('(empty)' x1, 'u' x1)" in caplog.text


def test_read_adience_errors(tmp_path):
    one_line_error(r"fold=5: Adience has the folds 0..4", read_adience_age, tmp_path, fold=5)
    message = one_line_error("adience/aligned not found", read_adience_age, tmp_path)
    assert "fold_0_data.txt..fold_4_data.txt" in message and "landmark_aligned_face." in message
    base = write_adience(tmp_path)
    (base / "fold_3_data.txt").unlink()
    one_line_error("fold_3_data.txt not found: expected Adience's layout", read_adience_age, tmp_path)
    (base / "fold_3_data.txt").write_text("user_id\toriginal_image\tface_id\tgender\n")
    one_line_error("fold_3_data.txt:1: the header lacks age", read_adience_age, tmp_path)
    (base / "fold_3_data.txt").write_text(f"{ADIENCE_HEADER}\n\nu4\tg_o.jpg\t8\t(38, 43)\tf\t0\nu4\tg_o.jpg\n")
    one_line_error("fold_3_data.txt:4: 2 tab-separated fields, the header names 12", read_adience_age, tmp_path)


# ---- LFW pairs ---------------------------------------------------------------------------------------------------

# two folds of two matched then two mismatched pairs, as LFW's pairs.txt writes them (its header: "10\t300")
LFW_PAIRS = """2\t2
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Abdel_Madi_Shabneh\t1\tDean_Barker\t1
Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1
Zico\t1\t2
Abel_Pacheco\t2\t3
Zico\t3\tDean_Barker\t1
Akhmed_Zakayev\t2\tZico\t1
"""


def write_lfw(root: Path, folder: str = "lfw", pairs: str = "lfw/pairs.txt") -> Path:
    """LFW's <name>/<name>_<nnnn>.jpg images named in LFW_PAIRS (but Zico_0003) and its pairs.txt."""
    images = root / folder
    for line in LFW_PAIRS.splitlines()[1:]:
        fields = line.split("\t")
        named = [(fields[0], fields[1]), (fields[0], fields[2])] if len(fields) == 3 else [fields[:2], fields[2:]]
        for name, number in named:
            if (name, number) != ("Zico", "3"):
                write_image(images / name / f"{name}_{int(number):04d}.jpg")
    (root / pairs).parent.mkdir(parents=True, exist_ok=True)
    (root / pairs).write_text(LFW_PAIRS)
    return images


def test_read_lfw_pairs(tmp_path, caplog):
    images = write_lfw(tmp_path)
    with caplog.at_level(logging.WARNING, logger="clrun"):
        pairs = read_lfw_pairs(tmp_path)

    def image(name, number):
        return images / name / f"{name}_{number:04d}.jpg"

    assert pairs.folds == (
        (
            FacePair(image("Abel_Pacheco", 1), image("Abel_Pacheco", 4), True),
            FacePair(image("Akhmed_Zakayev", 1), image("Akhmed_Zakayev", 3), True),
            FacePair(image("Abdel_Madi_Shabneh", 1), image("Dean_Barker", 1), False),
            FacePair(image("Abdel_Madi_Shabneh", 1), image("Giancarlo_Fisichella", 1), False),
        ),
        (
            FacePair(image("Zico", 1), image("Zico", 2), True),
            FacePair(image("Abel_Pacheco", 2), image("Abel_Pacheco", 3), True),
            FacePair(image("Akhmed_Zakayev", 2), image("Zico", 1), False),
        ),
    )
    assert pairs.missing == (image("Zico", 3),) and pairs.official == 8 and len(pairs) == 7
    assert f"1 of 8 pairs left out, 1 images they name are missing (first: {image('Zico', 3)})" in caplog.text


def test_read_lfw_pairs_in_cpgs_layout(tmp_path):
    write_lfw(tmp_path, folder="data/face_verification/val", pairs="face_data/lfw_pairs.txt")
    pairs = read_lfw_pairs(tmp_path, folder="data/face_verification/val", pairs="face_data/lfw_pairs.txt")
    assert [len(fold) for fold in pairs.folds] == [4, 3]
    assert pairs.folds[0][0].a == tmp_path / "data/face_verification/val/Abel_Pacheco/Abel_Pacheco_0001.jpg"


def test_read_lfw_pairs_errors(tmp_path):
    message = one_line_error("lfw/pairs.txt not found", read_lfw_pairs, tmp_path)
    assert "{pairs.txt,<name>/<name>_<nnnn>.jpg}" in message and "data.root" in message
    write_lfw(tmp_path)
    path = tmp_path / "lfw" / "pairs.txt"
    path.write_text("10 three\n")
    one_line_error(r"pairs.txt:1: expected the header '<folds> <pairs per fold>'", read_lfw_pairs, tmp_path)
    path.write_text(LFW_PAIRS.replace("2\t2", "3\t2"))
    one_line_error(r"pairs.txt: 8 pair lines, its header '3 2' means 12", read_lfw_pairs, tmp_path)
    path.write_text(LFW_PAIRS.replace("Zico\t1\t2", "Zico\t1\tDean_Barker\t2"))
    one_line_error(r"pairs.txt:6: expected a matched pair 'name n1 n2'", read_lfw_pairs, tmp_path)
    path.write_text(LFW_PAIRS.replace("Zico\t3\tDean_Barker\t1", "Zico\t3\tDean_Barker\tone"))
    one_line_error(r"pairs.txt:8: expected a mismatched pair", read_lfw_pairs, tmp_path)


# ---- the stream YAML -------------------------------------------------------------------------------------------


def test_cpg_faces_yaml(tmp_path):
    stream = compose_config("stream=cpg_faces", f"data.root={tmp_path}").stream
    assert dict(stream.dataset) == {
        "_target_": "clrun.data.faces.read_cpg_faces",
        "tasks": ["face_verification", "gender", "emotion", "age0"],
        "folder": "face_data",
        "lfw_pairs": "face_data/lfw_pairs.txt",
    }
    keys = ("split", "scenario", "resize", "crop", "normalize")
    assert [getattr(stream, key).value for key in keys] == ["release", "task", "stretch", "none", "half"]
    assert (stream.n_tasks, list(stream.image_size), stream.input_size) == (4, [112, 112], None)
    assert (stream.augment, stream.flip, stream.cutout) == (True, True, 0)


def test_two_task_stream_through_the_cli(tmp_path):
    write_cpg_faces(tmp_path / "data")
    tasks = "stream.dataset.tasks=[gender,emotion,age0]"
    result = clrun(tmp_path, "stream=cpg_faces", f"data.root={tmp_path / 'data'}", tasks, *IMAGE_RUN)
    assert result.returncode == 0, result.stderr
    task_rows, accuracy = run_tables(tmp_path)
    assert list(zip(task_rows["name"], task_rows["n_train"], strict=True)) == [("gender", 5), ("emotion", 4)]
    assert accuracy["eval_task_name"].tolist() == ["gender", "gender", "emotion"]


def test_adience_gender_stream_through_the_cli(tmp_path):
    write_adience(tmp_path / "data")
    reader = ["stream.dataset._target_=clrun.data.faces.read_adience_gender", "~stream.dataset.tasks"]
    reader += ["~stream.dataset.lfw_pairs"]
    reader += ["stream.dataset.folder=adience", "+stream.dataset.fold=0"]
    split = ["stream.split=contiguous", "stream.classes_per_task=1"]  # task 0: f, task 1: m
    result = clrun(tmp_path, "stream=cpg_faces", f"data.root={tmp_path / 'data'}", *reader, *split, *IMAGE_RUN)
    assert result.returncode == 0, result.stderr
    task_rows, accuracy = run_tables(tmp_path)
    assert list(zip(task_rows["name"], task_rows["n_train"], strict=True)) == [("0", 2), ("1", 3)]
    assert accuracy.groupby("eval_task").n_samples.first().tolist() == [1, 1]
