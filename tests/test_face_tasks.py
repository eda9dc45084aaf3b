"""CPG's face tasks end to end (Table 4's machinery): face_verification tested on LFW's pairs through the stream, its
FaceHead trained with A-Softmax, scored as 10-fold verification accuracy (mean in `accuracy`, std in
`accuracy_std`); class-weighted cross-entropy where a task's config gives class counts."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_method, clrun, compose_config, one_line_error, run_tables
from test_faces import LFW_PAIRS, write_cpg_faces, write_lfw

from clrun.data import build_stream
from clrun.data.faces import read_cpg_faces
from clrun.data.stream import Pairs
from clrun.data.synthetic import write_face_folders
from clrun.models.faces import FaceHead, angle_loss, class_weights
from clrun.train import Step

FACES = ["stream=cpg_faces", "hardware=cpu", "hardware.threads=1", "backbone=sphereface20"]
FACES += ["backbone.width=0.125", "method.eval_batch_size=16"]
TINY_CPG = ["method=cpg", "method.train.epochs=1", "method.train.batch_size=8", "method.prune_train.epochs=1"]
TINY_CPG += ["method.sparsities=[0.5]", "method.retrain.epochs=1", "method.goals=0.0"]
EMOTION = [74874, 134415, 25459, 14090, 6378, 3803, 24882]  # AffectNet's training counts (CPG's utils/manager.py)


def test_read_cpg_faces_with_lfw_pairs(tmp_path):
    write_cpg_faces(tmp_path)
    write_lfw(tmp_path, folder="face_data/face_verification/val", pairs="face_data/lfw_pairs.txt")
    files = read_cpg_faces(tmp_path, tasks=["face_verification", "gender"], lfw_pairs="face_data/lfw_pairs.txt")
    face, gender = files.tasks
    assert face.pairs is not None and gender.pairs is None
    assert len(face.pairs) == 7 and face.pairs.same == (True, True, False, False, True, True, False)  # Zico_0003 gone
    val = tmp_path / "face_data" / "face_verification" / "val"
    first, second = face.pairs.paths[face.pairs.a[0]], face.pairs.paths[face.pairs.b[0]]
    assert (first, second) == (
        val / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg",
        val / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg",
    )
    assert len(set(face.pairs.paths)) == len(face.pairs.paths)  # each image listed once
    assert set(files.test.labels) == {2, 3}  # no labelled test images of face_verification: gender's only
    # LFW elsewhere
    write_lfw(tmp_path, folder="lfw", pairs="lfw/pairs.txt")
    files = read_cpg_faces(tmp_path, tasks=["face_verification"], lfw_pairs="lfw/pairs.txt", lfw_folder="lfw")
    assert files.tasks[0].pairs.paths[0] == tmp_path / "lfw" / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"
    assert LFW_PAIRS.startswith("2\t2")


def test_the_stream_tests_face_verification_on_pairs(tmp_path):
    write_face_folders(tmp_path / "data")
    cfg = compose_config(*FACES, f"data.root={tmp_path / 'data'}", f"data.cache={tmp_path / 'cache'}")
    stream = build_stream(cfg.stream, cfg.data, 0, "cpu")
    face, gender = stream.tasks[:2]
    assert face.verification and not gender.verification
    assert isinstance(face.test, Pairs) and len(face.test) == 40 and int(face.test.same.sum()) == 20
    assert face.test.x.shape[1:] == (3, 112, 112) and face.test.x.dtype == torch.uint8
    assert int(face.test.a.max()) < len(face.test.x) and face.n_classes == 6 and len(face.train) == 24
    assert [task.name for task in stream.tasks] == ["face_verification", "gender", "emotion", "age0"]
    classes = compose_config(*FACES, f"data.root={tmp_path / 'data'}", f"data.cache={tmp_path / 'cache'}")
    classes.stream.scenario = "class"
    one_line_error(
        "face_verification is a verification task .* stream.scenario=task only",
        build_stream,
        classes.stream,
        classes.data,
        0,
        "cpu",
    )


def face_method(tmp_path, *overrides):
    write_face_folders(tmp_path / "data")
    data = [f"data.root={tmp_path / 'data'}", f"data.cache={tmp_path / 'cache'}"]
    return build_method(
        None,
        *FACES,
        *data,
        "stream.dataset.tasks=[face_verification,emotion]",
        "stream.n_tasks=2",
        *TINY_CPG,
        *overrides,
    )


def step(number: int) -> Step:
    return Step(number, 0, number, 10, 0, 80)


def test_criteria_angle_loss_and_class_weights(tmp_path):
    method, stream, _ = face_method(tmp_path, f"+method.task_overrides.emotion.class_counts={EMOTION}")
    face, emotion = stream.tasks
    for task in stream.tasks:
        method.add_head(task)
    head = method.net.heads.heads[0]
    assert isinstance(head, FaceHead) and head.embedding.in_features == method.net.backbone.out_features == 64 * 49
    torch.manual_seed(0)
    features, y = torch.randn(5, 64 * 49), torch.tensor([0, 1, 2, 3, 4])
    value, logits = method.criterion(face)(features, y, step(9))
    torch.testing.assert_close(value, angle_loss(head.angular(features), y, 10))  # lambda counts steps from 1
    torch.testing.assert_close(logits, head(features))
    value, logits = method.criterion(emotion)(features, y, step(0))
    weighted = F.cross_entropy(method.net.heads.heads[1](features), y, weight=class_weights(EMOTION))
    torch.testing.assert_close(value, weighted)
    assert not torch.allclose(value, F.cross_entropy(logits, y))


def test_class_counts_must_match_the_classes(tmp_path):
    one_line_error(
        "method.class_counts of task emotion: 3 counts for its 7 classes",
        face_method,
        tmp_path,
        "+method.task_overrides.emotion.class_counts=[1,2,3]",
    )


def test_face_heads_survive_the_checkpoint(tmp_path):
    method, stream, _ = face_method(tmp_path)
    method.learn(stream.tasks[0])
    x = torch.rand(3, 3, 112, 112)
    before = method.embed(x, 0)
    assert before.shape == (3, 512)
    state = method.state_dict()
    again, _, _ = face_method(tmp_path)
    again.load_state_dict(state)
    torch.testing.assert_close(again.embed(x, 0), before)
    assert isinstance(again.net.heads.heads[0], FaceHead)


def test_cpg_scores_face_verification_through_the_cli(tmp_path):
    write_face_folders(tmp_path / "data")
    tasks = ["stream.dataset.tasks=[face_verification,emotion]", "stream.n_tasks=2"]
    counts = f"+method.task_overrides.emotion.class_counts={EMOTION}".replace(" ", "")
    result = clrun(tmp_path, *FACES, "data.cache=cache", f"data.root={tmp_path / 'data'}", *tasks, *TINY_CPG, counts)
    assert result.returncode == 0, result.stderr
    task_rows, accuracy = run_tables(tmp_path)
    assert task_rows["name"].tolist() == ["face_verification", "emotion"]
    face = accuracy[accuracy["eval_task_name"] == "face_verification"]
    assert len(face) == 2 and face["accuracy"].nunique() == 1 and face["accuracy_std"].nunique() == 1  # no forgetting
    assert face["accuracy"].between(0, 1).all() and face["accuracy_std"].notna().all()
    assert (face["n_samples"] == 40).all()
    assert accuracy.loc[accuracy["eval_task_name"] == "emotion", "accuracy_std"].isna().all()


def test_a_method_without_embed_refuses_a_verification_task(tmp_path):
    write_face_folders(tmp_path / "data", tasks={"face_verification": 3, "gender": 3})
    tasks = ["stream.dataset.tasks=[face_verification,gender]", "stream.n_tasks=2"]
    result = clrun(
        tmp_path,
        *FACES,
        "data.cache=cache",
        f"data.root={tmp_path / 'data'}",
        *tasks,
        "method=ewc",
        "method.train.iterations=1",
    )
    assert result.returncode != 0
    assert "cannot score the verification task face_verification" in result.stderr


@pytest.mark.parametrize("tasks", [{"face_verification": 3}])
def test_write_face_folders_is_read_back(tmp_path, tasks):
    write_face_folders(tmp_path, tasks=tasks, pairs_per_fold=1)
    files = read_cpg_faces(tmp_path, tasks=list(tasks), lfw_pairs="face_data/lfw_pairs.txt")
    assert len(files.tasks[0].pairs) == 20 and sum(files.tasks[0].pairs.same) == 10
    assert files.classes == ("face_verification/c0", "face_verification/c1", "face_verification/c2")


@pytest.mark.parametrize("method", ["scratch", "finetune"])
def test_individual_models_and_finetune_score_face_verification(tmp_path, method):
    write_face_folders(tmp_path / "data", tasks={"face_verification": 3, "gender": 3})
    tasks = ["stream.dataset.tasks=[face_verification,gender]", "stream.n_tasks=2"]
    run = [f"method={method}", "method.train.iterations=2", "method.train.batch_size=4"]
    result = clrun(tmp_path, *FACES, "data.cache=cache", f"data.root={tmp_path / 'data'}", *tasks, *run)
    assert result.returncode == 0, result.stderr
    _, accuracy = run_tables(tmp_path)
    face = accuracy[accuracy["eval_task_name"] == "face_verification"]
    assert len(face) == 2 and face["accuracy_std"].notna().all() and face["accuracy"].between(0, 1).all()
    if method == "scratch":  # its own model per task: nothing forgotten
        assert face["accuracy"].nunique() == 1
