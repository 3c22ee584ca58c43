"""The pure formatters: `--json` shapes against SPEC section 3's key lists, and the human tables."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import cli_fakes as f
from spurguard.client.cli import format as fmt
from spurguard import vocab as t
from spurguard.vocab import to_json

SCORE_KEYS = {"image", "predictions", "class", "logit", "bias_term", "residual", "components",
              "spurious_alpha", "trigger", "spufix"}
COMPONENT_KEYS = {"index", "eigenvalue", "explained_variance", "alpha_mean", "alpha_floor", "alpha_max", "label"}
CLASS_SCORE_KEYS = {"class", "auc", "ap", "clean_mean_prob", "spurious_mean_prob", "clean_frac_predicted",
                    "spurious_frac_predicted"}


def test_score_line_has_the_spec_keys_and_values() -> None:
    line = json.loads(fmt.json_line(f.score_result("a.png").to_dict()))
    assert SCORE_KEYS <= set(line)
    assert line["image"] == "a.png" and line["class"] == 3 and line["trigger"] is True
    assert line["predictions"][0] == {"class": 3, "name": "cat", "prob": 0.75, "logit": 4.0}
    assert line["components"] == [{"index": 0, "alpha": 2.0, "label": "spurious"},
                                  {"index": 1, "alpha": 0.25, "label": "unlabeled"}]
    assert set(line["spufix"]) == {"mode", "logit", "predictions"} and line["spufix"]["mode"] == "floor"
    assert line["spufix"]["predictions"][0]["name"] == "dog"
    assert "\n" not in fmt.json_line(f.score_result("a.png").to_dict())


def test_failed_score_line_is_image_and_error_only() -> None:
    line = json.loads(fmt.json_line(f.failed_result("b.png", "NOT_FOUND", "gone").to_dict()))
    assert line == {"image": "b.png", "error": {"code": "NOT_FOUND", "message": "gone"}}


def test_components_document() -> None:
    doc = json.loads(fmt.json_document(f.components()))
    assert {"model", "class", "images", "components"} <= set(doc)
    assert (doc["model"], doc["class"], doc["images"]) == ("tiny", 3, 40)
    assert [COMPONENT_KEYS <= set(c) for c in doc["components"]] == [True, True]
    first = doc["components"][0]
    assert (first["index"], first["eigenvalue"], first["alpha_floor"], first["label"], first["note"]) == (
        0, 4.0, -1.25, "spurious", "watermark")
    assert doc["bias_term"] == 1.5 and doc["fit_id"] == "fit-1"


def test_evaluate_document_with_and_without_spufix() -> None:
    doc = json.loads(fmt.json_document(f.evaluate_result().to_dict()))
    assert {"mean_auc", "mean_ap", "classes", "spufix"} <= set(doc)
    assert [set(c) for c in doc["classes"]] == [CLASS_SCORE_KEYS] * 2
    assert doc["mean_auc"] == 0.625 and doc["classes"][1]["class"] == 7
    assert doc["spufix"]["mode"] == "floor" and doc["spufix"]["mean_auc"] == 0.875
    assert [set(c) for c in doc["spufix"]["classes"]] == [CLASS_SCORE_KEYS] * 2
    assert (doc["clean_images"], doc["spurious_images"], doc["clean_accuracy"]) == (20, 12, 0.75)
    plain = replace(f.evaluate_result(), spufix=None, spufix_mode=None).to_dict()
    assert "spufix" not in plain


def test_non_finite_numbers_become_null() -> None:
    doc = json.loads(fmt.json_document(f.evaluate_result(auc=math.nan).to_dict()))
    assert doc["mean_auc"] is None and doc["classes"][0]["auc"] is None
    assert to_json({"a": [math.inf, 1.0, (-math.inf,)]}) == {"a": [None, 1.0, [None]]}


def test_model_job_label_and_fit_documents() -> None:
    m = to_json(f.model())
    assert (m["name"], m["num_classes"], m["feature_dim"], m["input_size"]) == ("tiny", 10, 8, 16)
    assert (m["backend"], m["device"], m["fitted_classes"]) == ("torch", "cpu", [0, 1, 2, 5])
    assert m["classes"] == []  # list_models sends none
    job = json.loads(fmt.json_document(f.job(state="succeeded")))
    assert (job["job_id"], job["state"], job["request"]["dataset"]) == ("job-1", "succeeded", "/data/train")
    assert job["progress"]["images_done"] == 10 and job["summary"]["fit_id"] == "fit-1"
    assert job["created"] == "2026-01-02T03:04:05+00:00" and job["error"] is None
    summary = to_json(f.fit_summary())
    assert summary["classes"] == [{"class": 0, "images": 20, "num_components": 2},
                                  {"class": 1, "images": 20, "num_components": 2}]
    record = f.FakeClient().label("tiny", 3, 1, "spurious", note="why")
    assert to_json(record) == {"model": "tiny", "fit_id": "fit-1", "class": 3, "component": 1,
                                         "label": "spurious", "note": "why", "updated": "2026-01-02T03:04:05+00:00",
                                         "author": ""}


def test_render_table_pads_and_right_aligns() -> None:
    table = fmt.render_table(["NAME", "N"], [["a", "1"], ["long", "100"]], right=(1,))
    assert table.splitlines() == ["NAME    N", "a       1", "long  100"]


def test_index_ranges() -> None:
    assert fmt.index_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert fmt.index_ranges([]) == ""
    cut = fmt.index_ranges(list(range(0, 200, 2)), limit=20)
    assert len(cut) <= 20 and cut.endswith(",…") and cut.startswith("0,2,4")


def test_models_table() -> None:
    lines = fmt.models_table([f.model(classes=True), f.model("plain", fitted=())]).splitlines()
    assert lines[0].split() == ["MODEL", "CLASSES", "FEATURE_DIM", "INPUT_SIZE", "BACKEND", "RUNTIME", "DEVICE", "READY",
                                "FITTED_CLASSES", "NAMES"]
    assert lines[1].split() == ["tiny", "10", "8", "16", "torch", "onnxruntime", "cpu", "yes", "4", "(0-2,5)", "ant,",
                                "bee,", "cat,", "…", "(+2)"]
    assert lines[2].split()[-2:] == [fmt.MISSING, fmt.MISSING]  # no fit, no names (as ListModels sends it)
    assert fmt.models_table([]) == "no models loaded"


def test_score_table_rows() -> None:
    results = [f.score_result("a.png"), f.score_result("b.png", trigger=False), f.failed_result("c.png")]
    lines = fmt.score_table(results).splitlines()
    assert lines[0].split() == ["IMAGE", "PREDICTED", "PROB", "TRIGGER", "SPURIOUS_ALPHA", "SPUFIX"]
    assert lines[1].split() == ["a.png", "cat", "0.750", "yes", "3.25", "dog", "(0.750)"]
    assert lines[2].split()[3] == "no"
    assert lines[3].split() == ["c.png", "error:", "INVALID_ARGUMENT", "-", "-", "-", "-"]
    assert len(lines[3]) <= len(lines[1])  # the message is not in the table


def test_components_table() -> None:
    lines = fmt.components_table(f.components()).splitlines()
    assert "class 3" in lines[0] and "fit fit-1" in lines[0] and "images 40" in lines[0]
    assert lines[2].split() == ["0", "4", "50.0%", "0", "-1.25", "3.5", "spurious", "watermark"]
    assert lines[3].split() == ["1", "2", "25.0%", "0", "-0.5", "1.75", "unlabeled"]


def test_zero_up_to_rounding_prints_as_zero() -> None:
    """A mean of centred float32 alphas is 1e-8-ish or -0, not a number worth printing."""
    rounded = (t.Component(0, 4.0, 0.5, 1.2e-8, -1.25, 3.5, "unlabeled", ""),
               t.Component(1, 2.0, 0.25, -0.0, -0.5, 1.75, "unlabeled", ""),
               t.Component(2, 1.0, 0.1, -2e-3, -0.5, 1.75, "unlabeled", ""))
    lines = fmt.components_table(replace(f.components(), components=rounded)).splitlines()
    assert [line.split()[3] for line in lines[2:]] == ["0", "0", "-0.002"]  # a real mean stays
    assert (fmt.number(-0.0), fmt.number(1.2e-17), fmt.number(1.2e-17, scale=1.0), fmt.number(-3e-6, scale=1.0)) == (
        "0", "1.2e-17", "0", "-3e-06")


def test_evaluate_table_shows_without_and_with_spufix_side_by_side() -> None:
    lines = fmt.evaluate_table(f.evaluate_result()).splitlines()
    assert "with SpuFix (floor)" in lines[0]
    assert lines[1].split()[:3] == ["CLASS", "AUC", "AP"]
    assert lines[2].split()[0] == "3" and "0.625 → 0.875" in lines[2] and "0.800 → 0.750" in lines[2]
    assert "0.400 → 0.150" in lines[2]
    assert lines[4].split()[0] == "mean" and "0.625 → 0.875" in lines[4] and "0.575 → 0.825" in lines[4]
    assert "clean accuracy 0.750 → 0.700" in lines[5]
    plain = fmt.evaluate_table(replace(f.evaluate_result(), spufix=None, spufix_mode=None))
    assert "→ " not in plain.split("\n", 1)[1] and "0.625" in plain


def test_fit_label_and_jobs_text() -> None:
    summary = fmt.fit_summary_table(f.fit_summary()).splitlines()
    assert "fit fit-1 committed" in summary[0] and "40 images, 1 skipped, 2 classes" in summary[0]
    assert summary[2].split() == ["0", "20", "2"]
    record = f.FakeClient().label("tiny", 3, 1, "not_spurious", note="the object")
    assert fmt.label_line(record) == (
        "model tiny  class 3  component 1: not_spurious  (fit fit-1)  note: the object")
    assert fmt.label_line(replace(record, author="alice")) == (
        "model tiny  class 3  component 1: not_spurious  (fit fit-1)  by alice  note: the object")
    jobs = fmt.jobs_table([f.job(), f.job("job-2", "succeeded")]).splitlines()
    assert jobs[1].split()[:3] == ["job-1", "tiny", "running"]
    assert "features 10/40 images 1/4 classes" in jobs[1]
    assert jobs[2].endswith("fit fit-1")
    assert fmt.jobs_table([]) == "no jobs"
