"""Several models in one service: a tiny teacher and a tiny distilled student (``STUDENT_CARD``) on the
real app and engine. GET /models, the ``model`` field of /generate and the stream, the student's
defaults and distilled guidance, /readyz and the metrics per model, and the startup checks."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings
from model.io import WeightsError
from model.samplers import SAMPLERS

pytestmark = pytest.mark.timeout(120)

TEACHER, STUDENT = "tiny-test", "tiny-student"


@pytest.fixture
def two(make_settings: Callable[..., Settings], app_weights: Path, student_weights: Path) -> Iterator[TestClient]:
    """The teacher and the student, the teacher first (the default)."""
    with TestClient(create_app(make_settings(models=[app_weights, student_weights]))) as c:
        yield c


def test_get_models_lists_them_in_openais_shape_with_their_cards_defaults(
    two: TestClient, student_steps: int, test_steps: int
) -> None:
    body = two.get("/models").json()
    assert body["object"] == "list"
    teacher, student = body["data"]
    assert [m["id"] for m in body["data"]] == [TEACHER, STUDENT]  # the default first
    for m in (teacher, student):
        assert m["object"] == "model" and isinstance(m["created"], int) and m["created"] > 0
        assert m["owned_by"] == "fashion-diffusion" and m["samplers"] == list(SAMPLERS)
        assert m["parameters"] > 1000 and m["T"] == 1000 and m["device"] == "cpu"
        assert m["precision"] in ("float32", "bfloat16")
    assert teacher | {} == teacher | {"kind": "teacher", "parent": None, "default": True, "distilled_guidance": None}
    assert (teacher["sampler"], teacher["steps"], teacher["guidance"], teacher["guidance_interval"]) == (
        "dpm++",
        test_steps,
        2.0,
        None,
    )
    assert (student["kind"], student["parent"], student["default"]) == ("student", TEACHER, False)
    assert (student["sampler"], student["steps"], student["guidance"], student["guidance_interval"]) == (
        "consistency",
        student_steps,
        1.0,
        None,
    )
    assert student["distilled_guidance"] == 1.35
    # /readyz names each model's precision; its top-level fields stay the default model's.
    ready = two.get("/readyz").json()
    assert (ready["model"], ready["precision"]) == (TEACHER, teacher["precision"])
    assert [(m["name"], m["kind"], m["precision"]) for m in ready["models"]] == [
        (TEACHER, "teacher", teacher["precision"]),
        (STUDENT, "student", student["precision"]),
    ]


def test_the_first_listed_model_is_the_default(
    make_settings: Callable[..., Settings], app_weights: Path, student_weights: Path
) -> None:
    with TestClient(create_app(make_settings(models=[student_weights, app_weights]))) as c:
        assert [(m["id"], m["default"]) for m in c.get("/models").json()["data"]] == [(STUDENT, True), (TEACHER, False)]
        body = c.post("/generate", json={"class": 1, "n": 1}).json()
        assert body["model"] == STUDENT and body["params"]["sampler"] == "consistency"


def test_without_model_nothing_changes_and_with_it_the_students_defaults_apply(
    two: TestClient, client: TestClient, student_steps: int, decode_png: Callable
) -> None:
    request = {"class": "dress", "n": 3, "seed": 21}
    plain = two.post("/generate", json=request).json()
    alone = client.post("/generate", json=request).json()  # a server with the teacher alone
    assert plain["model"] == TEACHER and plain["params"] == alone["params"]
    assert [i["png"] for i in plain["images"]] == [i["png"] for i in alone["images"]]
    assert two.post("/generate", json={**request, "model": TEACHER}).json()["images"] == plain["images"]

    student = two.post("/generate", json={**request, "model": STUDENT}).json()
    assert student["model"] == STUDENT
    assert student["params"] == {
        "class": 3,
        "class_name": "dress",
        "n": 3,
        "sampler": "consistency",
        "steps": student_steps,
        "guidance": 1.0,
        "guidance_method": "classifier-free",
        "seed": 21,
    }
    assert all(decode_png(i["png"]).shape == (28, 28) for i in student["images"])
    assert [i["png"] for i in student["images"]] != [i["png"] for i in plain["images"]]  # another network
    grid = two.post("/generate", json={**request, "model": STUDENT}, headers={"Accept": "image/png"})
    assert grid.headers["x-model"] == STUDENT and grid.headers["x-sampler"] == "consistency"
    # The student may be asked for other parameters, as the teacher may.
    other = two.post("/generate", json={**request, "model": STUDENT, "sampler": "ddim", "steps": 2}).json()
    assert (other["params"]["sampler"], other["params"]["steps"]) == ("ddim", 2)


def test_an_unknown_model_is_404_naming_the_models(two: TestClient, error_of: Callable) -> None:
    answers = [
        two.post("/generate", json={"class": 1, "model": "fashion-nope"}),
        two.post("/generate/stream", json={"class": 1, "model": "fashion-nope"}),
        two.get("/generate/stream?class=1&model=fashion-nope"),
        two.get("/schedule?model=fashion-nope"),
    ]
    for r in answers:
        err = error_of(r, 404)
        assert (err["param"], err["code"], err["type"]) == ("model", "model_not_found", "not_found_error")
        assert "'fashion-nope'" in err["message"] and f"allowed: {TEACHER}, {STUDENT}" in err["message"]
    assert two.get(f"/schedule?model={STUDENT}").json()["T"] == 1000


def test_guidance_on_a_student_with_distilled_guidance_is_422(two: TestClient, error_of: Callable) -> None:
    for r in (
        two.post("/generate", json={"class": 1, "model": STUDENT, "guidance": 2.0}),
        two.post("/generate/stream", json={"class": 1, "model": STUDENT, "guidance": 0.0}),
    ):
        err = error_of(r, 422)
        assert (err["param"], err["code"]) == ("guidance", "guidance_distilled")
        assert err["message"].startswith("guidance:") and "1.35 is distilled into tiny-student" in err["message"]
        assert "allowed: 1.0 or omit guidance" in err["message"]
    assert two.post("/generate", json={"class": 1, "n": 1, "model": STUDENT, "guidance": 1.0}).status_code == 200
    assert two.post("/generate", json={"class": 1, "n": 1, "guidance": 3.0}).status_code == 200  # the teacher guides


def test_the_students_stream_has_its_steps_each_with_x0_and_x_t(
    two: TestClient, parse_sse: Callable, decode_png: Callable, student_steps: int
) -> None:
    request = {"class": "bag", "n": 2, "seed": 5, "model": STUDENT}
    events = parse_sse(two.post("/generate/stream", json=request).text)
    assert [name for name, _ in events] == ["start", *["step"] * student_steps, "done"]
    start, done = events[0][1], events[-1][1]
    assert start["model"] == STUDENT and start["params"]["sampler"] == "consistency"
    steps = [data for name, data in events if name == "step"]
    assert [s["index"] for s in steps] == list(range(student_steps)) and steps[0]["t"] == 999
    for s in steps:  # 4 steps: a preview on every one
        assert decode_png(s["x0_png"]).shape == decode_png(s["xt_png"]).shape == (32, 62)  # 2 tiles side by side
    # Consistency sampling ends on the last x0 prediction, and the done event is /generate's answer.
    assert (decode_png(steps[-1]["x0_png"])[2:30, 2:30] == decode_png(done["images"][0]["png"])).all()
    assert done["model"] == STUDENT
    assert done["images"] == two.post("/generate", json=request).json()["images"]
    got = parse_sse(two.get(f"/generate/stream?class=bag&n=2&seed=5&model={STUDENT}").text)
    assert got[-1][1]["images"] == done["images"]


def test_a_student_request_does_not_wait_for_a_long_teacher_stream(two: TestClient) -> None:
    body = {"class": 1, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1000}
    first_step, finished = threading.Event(), threading.Event()

    def teacher_stream() -> None:
        with two.stream("POST", "/generate/stream", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: step"):
                    first_step.set()
            finished.set()

    thread = threading.Thread(target=teacher_stream)
    thread.start()
    assert first_step.wait(30)
    student = two.post("/generate", json={"class": 2, "n": 2, "model": STUDENT}).json()
    assert not finished.is_set()  # answered while the teacher's 1000 steps still run
    assert student["timings"]["batch_jobs"] == 1  # its evaluations held its own rows only
    thread.join(60)


def test_the_metrics_name_each_model(two: TestClient, metric: Callable) -> None:
    two.post("/generate", json={"class": 1, "n": 2, "model": STUDENT})
    text = two.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = {s.labels["name"]: s.labels for s in families["fashion_model_info"].samples}
    assert list(info) == [TEACHER, STUDENT]
    assert (info[TEACHER]["kind"], info[STUDENT]["kind"]) == ("teacher", "student")
    assert info[STUDENT]["weights"] == "student.safetensors" and info[STUDENT]["precision"]
    assert metric(text, "fashion_images_generated_total", model=STUDENT, sampler="consistency") == 2
    assert metric(text, "fashion_images_generated_total", model=TEACHER) == 0
    assert metric(text, "fashion_sampler_steps_total", model=STUDENT) == 4
    assert metric(text, "fashion_tick_rows_sum", model=STUDENT) == 4 * 2  # unguided: one row per image


def test_rerank_samples_its_candidates_with_the_requested_model(
    make_settings: Callable[..., Settings], app_weights: Path, student_weights: Path, tiny_classifier: Path
) -> None:
    settings = make_settings(models=[app_weights, student_weights], classifier_weights=tiny_classifier)
    with TestClient(create_app(settings)) as c:
        request = {"class": 4, "n": 2, "seed": 9, "model": STUDENT}
        body = c.post("/generate", json={**request, "rerank": {"by": "classifier", "candidates": 4}}).json()
        assert body["model"] == STUDENT and len(body["images"]) == 2
        pngs = [i["png"] for i in c.post("/generate", json={**request, "n": 4}).json()["images"]]
        assert [i["png"] for i in body["images"]] == [pngs[i["seed"] - 9] for i in body["images"]]


def test_the_default_models_settings_leave_the_other_models_card_alone(
    make_settings: Callable[..., Settings], app_weights: Path, student_weights: Path, student_steps: int
) -> None:
    with TestClient(create_app(make_settings(models=[app_weights, student_weights], steps=2, guidance=1.5))) as c:
        teacher, student = c.get("/models").json()["data"]
        assert (teacher["steps"], teacher["guidance"]) == (2, 1.5)
        assert (student["steps"], student["guidance"]) == (student_steps, 1.0)
    with (
        pytest.raises(WeightsError, match="guidance 1.35 is distilled into this model"),
        TestClient(create_app(make_settings(models=[student_weights], guidance=2.0))),
    ):
        pass


def test_startup_refuses_two_models_with_one_name_or_a_missing_file(
    make_settings: Callable[..., Settings], app_weights: Path, tmp_path: Path
) -> None:
    twin = tmp_path / "twin.safetensors"
    shutil.copy(app_weights, twin)
    shutil.copy(app_weights.with_suffix(".json"), twin.with_suffix(".json"))
    with (
        pytest.raises(WeightsError, match=f"the model name 'tiny-test' is taken by {app_weights}"),
        TestClient(create_app(make_settings(models=[app_weights, twin]))),
    ):
        pass
    missing = tmp_path / "fashion-student.safetensors"
    with (
        pytest.raises(WeightsError, match=f"{missing}: weights file not found"),
        TestClient(create_app(make_settings(models=[app_weights, missing]))),
    ):
        pass


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"sampling": {"sampler": "euler"}}, "sampling.sampler 'euler'"),
        ({"diffusion": {"schedule": "sigmoid", "T": 1000, "prediction": "v"}}, "unknown schedule 'sigmoid'"),
        ({"distillation": {"teacher": "tiny-test", "guidance": -1}}, "distillation.guidance must be >= 0"),
        ({"sampling": {"sigma_min": 100}}, r"sampling.sigma_min: sigma_min must be in \[0.006425, 80\)"),
    ],
)
def test_every_card_is_checked_before_any_tensor_loads(
    make_settings: Callable[..., Settings],
    app_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: dict,
    match: str,
) -> None:
    from app.generation import models

    second = tmp_path / "second.safetensors"
    shutil.copy(app_weights, second)
    card = json.loads(app_weights.with_suffix(".json").read_text())
    second.with_suffix(".json").write_text(json.dumps({**card, "name": "second", **section}))
    loaded: list[Path] = []
    monkeypatch.setattr(models, "load_weights", lambda path, device: loaded.append(path))
    with pytest.raises(WeightsError, match=match):
        models.load_models(make_settings(models=[app_weights, second]), torch.device("cpu"))
    assert loaded == []  # the first model's tensors were not read either


def test_the_models_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    monkeypatch.setenv("FASHION_MODELS", json.dumps([str(a), str(b)]))
    assert Settings().model_paths == (a, b)
    with pytest.raises(ValidationError, match="set models or weights, not both"):
        Settings(weights=a)
    with pytest.raises(ValidationError, match="models lists .*a.safetensors twice"):
        Settings(models=[a, a])
    with pytest.raises(ValidationError, match="at least one"):
        Settings(models=[])
    monkeypatch.delenv("FASHION_MODELS")
    # Unset: the shipped models of weights_dir that exist, the teacher first.
    assert Settings(weights_dir=tmp_path).model_paths == (tmp_path / "fashion-unet.safetensors",)
    for name in ("fashion-student", "fashion-unet"):
        (tmp_path / f"{name}.safetensors").touch()
    assert [p.name for p in Settings(weights_dir=tmp_path).model_paths] == [
        "fashion-unet.safetensors",
        "fashion-student.safetensors",
    ]
    assert Settings(weights_dir=tmp_path, weights=a).model_paths == (a,)


def test_python_m_app_serves_the_models_of_fashion_models(
    app_weights: Path, student_weights: Path, spawn_app: Callable
) -> None:
    import httpx

    _, url = spawn_app(models=json.dumps([str(app_weights), str(student_weights)]))
    assert [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]] == [TEACHER, STUDENT]
    r = httpx.post(f"{url}/generate", json={"class": 1, "n": 1, "model": STUDENT}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == STUDENT
