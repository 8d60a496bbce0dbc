"""`mmdit annotate`: the answer parser on recorded model outputs, the alignment score, and the
command end to end over a produced cache, with the tiny random models and with a stand-in VL
model that answers recorded JSON (the ok path: category trust order, flags, visible text)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from badfiles import encode, shapes, write_shard
from jsonschema import Draft202012Validator
from PIL import Image

from mmdit.cache.categories import CATEGORIES
from mmdit.cache.manifest import SCHEMA as MANIFEST_SCHEMA
from mmdit.cache.manifest import read_manifest
from mmdit.config.data import DataConfig
from mmdit.config.produce import AnnotateConfig, SynthConfig
from mmdit.producer.annotate.answers import INVALID, KEYS, OK, PROMPT, SCHEMA, UNPARSEABLE, parse
from mmdit.producer.annotate.run import VLAnnotator, annotate, annotated_row, batches, pending, vl_size

BASE = 64
ANNOTATION_COLUMNS = {"alignment", "annotation_status", "annotation", "watermark", "qr_code", "mosaic",
                      "visible_text", "style"}
GOOD = {
    "caption": 'A red poster reading "Grand opening" above a QR code', "category": "Design",
    "objects": ["poster", "QR code"], "text": "Grand opening", "watermark": False, "qr_code": True,
    "mosaic": False, "style": "flat graphic design",
}
ZH = {**GOOD, "caption": "一张红色海报，上面写着“欢迎光临”", "text": "欢迎光临", "category": "text rendering"}


def dumps(obj, **kw):
    return json.dumps(obj, ensure_ascii=False, **kw)


# ----------------------------------------------------------------------------- the parser

RECORDED = [  # (name, model output, status, what the error or value must show)
    ("good", dumps(GOOD), OK, "design"),
    ("fenced", "```json\n" + dumps(GOOD, indent=2) + "\n```", OK, "design"),
    ("prose around", "Sure! Here is the annotation {as requested}:\n" + dumps(GOOD) + "\nAnything else?", OK, "design"),
    ("chinese", "```\n" + dumps(ZH) + "\n```", OK, "text_rendering"),
    ("extra key", dumps({**GOOD, "confidence": 0.9}), OK, "design"),
    ("wrong type", dumps({**GOOD, "watermark": "yes"}), INVALID, "watermark: 'yes' is not of type 'boolean'"),
    ("objects not a list", dumps({**GOOD, "objects": "poster, text"}), INVALID, "objects"),
    ("missing keys", dumps({k: v for k, v in GOOD.items() if k not in ("style", "mosaic")}), INVALID,
     "is a required property"),
    ("unknown category", dumps({**GOOD, "category": "landscape"}), INVALID, "category: unknown category 'landscape'"),
    ("blank caption", dumps({**GOOD, "caption": "  "}), INVALID, "caption"),
    ("truncated", dumps(GOOD)[:70], UNPARSEABLE, "malformed JSON"),
    ("empty", "", UNPARSEABLE, "no JSON object"),
    ("prose only", "I am sorry, I cannot describe this image.", UNPARSEABLE, "no JSON object"),
    ("a list", '["poster", "text"]', UNPARSEABLE, "no JSON object"),
]


@pytest.mark.parametrize("name,output,status,shows", RECORDED, ids=[r[0] for r in RECORDED])
def test_parser_on_recorded_outputs(name, output, status, shows):
    parsed = parse(output)
    assert parsed.status == status, parsed.error
    cols = parsed.columns()
    assert cols["annotation_status"] == status
    if status == OK:
        assert parsed.error == "" and list(parsed.value) == list(KEYS) and parsed.value["category"] == shows
        assert json.loads(cols["annotation"]) == parsed.value
        assert cols["visible_text"] == parsed.value["text"] and cols["qr_code"] is True and cols["watermark"] is False
    else:
        assert shows in parsed.error and parsed.value is None
        assert cols["annotation"] == output and cols["watermark"] is cols["visible_text"] is None  # raw output kept


def test_chinese_answer_keeps_its_text_verbatim():
    parsed = parse(dumps(ZH))
    assert parsed.value["text"] == "欢迎光临" and "欢迎光临" in parsed.columns()["annotation"]  # not \\u-escaped
    assert parsed.value["caption"] == ZH["caption"]


def test_schema_and_prompt_cover_every_key_and_category():
    Draft202012Validator.check_schema(SCHEMA)
    assert set(SCHEMA["required"]) == set(SCHEMA["properties"]) == set(KEYS)
    for word in (*KEYS, *CATEGORIES):
        assert f'"{word}"' in PROMPT


def test_failed_output_is_stored_truncated():
    assert len(parse("x" * 10_000).columns()["annotation"]) == 2000


# ----------------------------------------------------------------------------- rows and helpers


def test_annotated_row_applies_the_trust_order_and_keeps_the_rest():
    base = {c: None for c in MANIFEST_SCHEMA.names} | {"key": "s/1", "width": 96, "text_chars": 3, "phash": 7}
    ok = parse(dumps(GOOD))
    for source, want in (("metadata", ("synthetic", "metadata")), ("source", ("design", "annotation")),
                         ("annotation", ("design", "annotation")), ("", ("design", "annotation")),
                         (None, ("design", "annotation"))):
        row = annotated_row({**base, "category": "synthetic" if source == "metadata" else "people",
                             "category_source": source}, ok)
        assert (row["category"], row["category_source"]) == want
        assert row["text_chars"] == len("Grand opening") and row["width"] == 96 and row["phash"] == 7
    assert annotated_row({**base, "text_chars": 40}, ok)["text_chars"] == 40
    failed = annotated_row({**base, "category": "people", "category_source": "source"}, parse("no"))
    assert (failed["category"], failed["category_source"], failed["text_chars"]) == ("people", "source", 3)
    assert failed["annotation_status"] == UNPARSEABLE and failed["annotation"] == "no"


@pytest.mark.parametrize("w,h", [(1000, 500), (64, 64), (300, 2000), (10, 10)])
def test_vl_size_keeps_aspect_in_multiples_of_28(w, h):
    vw, vh = vl_size(Image.new("RGB", (w, h)), 448 * 448)
    assert vw % 28 == 0 and vh % 28 == 0
    assert abs(vw * vh / (448 * 448) - 1) < 0.2 and abs(vw / vh - w / h) / (w / h) < 0.15


def test_batches_respect_size_and_limit():
    assert list(batches(iter(range(7)), 3, 0)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batches(iter(range(7)), 3, 5)) == [[0, 1, 2], [3, 4]]
    assert list(batches(iter(range(2)), 3, 5)) == [[0, 1]]


def test_config_is_checked():
    with pytest.raises(ValueError, match="batch_size"):
        AnnotateConfig(batch_size=0)
    with pytest.raises(ValueError, match="image_area"):
        AnnotateConfig(image_area=100)


# ----------------------------------------------------------------------------- alignment


@pytest.fixture(scope="module")
def scorer(tiny_encoders_dir):
    from mmdit.producer.annotate.alignment import AlignmentScorer

    return AlignmentScorer.load(str(Path(tiny_encoders_dir) / "alignment"))


@pytest.mark.slow
def test_alignment_is_the_models_cosine_similarity(scorer):
    images = [shapes(i, 80 + 16 * i, 64) for i in range(3)]
    captions = ["red ellipses", "一张蓝色的图片", "a long caption " * 40]  # the last one is over 32 tokens
    scores = scorer.score(images, captions)
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 3
    assert scorer.score(images, captions, batch_size=1) == pytest.approx(scores, abs=1e-6)  # batching: no effect
    assert scorer.score(images, captions) == scores  # deterministic
    # by hand: CLIP's logits are logit_scale * cosine
    inputs = scorer.processor(text=captions[:1], images=images[:1], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    assert scores[0] == pytest.approx((out.logits_per_image / scorer.model.logit_scale.exp()).item(), abs=1e-5)
    # past the text tower's 32 positions the caption is cut: what follows does not count
    longer = scorer.score(images[2:], ["a long caption " * 40 + "and a very different ending"])
    assert scorer.max_length == 32 and longer == pytest.approx(scores[2:], abs=1e-6)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def produced(tmp_path_factory, tiny_encoders_dir):
    """Synth shards plus a 'web' shard whose samples carry a metadata category or none (the
    source names one: data.source_categories.web=people), produced into a cache once."""
    from mmdit.config.produce import CacheConfig, EncodersConfig
    from mmdit.producer.encoders import Encoders
    from mmdit.producer.produce import produce
    from mmdit.producer.synth.shards import write_shards

    d = tmp_path_factory.mktemp("annotate")
    write_shards(str(d / "shards"), SynthConfig(num_samples=10, samples_per_shard=5, min_side=128, max_side=160))
    write_shard(d / "shards" / "web-000000.tar", [
        (f"web{i}", {"png": encode(shapes(100 + i, 96, 80)), "txt": f"ellipses number {i}".encode(),
                     **({"json": b'{"category": "Synthetic"}'} if i < 2 else {})})
        for i in range(4)
    ])
    data = DataConfig(shards=[str(d / "shards" / "*.tar")], base_resolution=BASE, source_categories={"web": "people"})
    report = produce(data, CacheConfig(dir=str(d / "cache")), Encoders.load(EncodersConfig(dir=tiny_encoders_dir)),
                     progress=False)
    assert report["accepted"] == 14, report
    return data, d / "cache"


@pytest.fixture()
def cache(produced, tmp_path):
    shutil.copytree(produced[1], tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_vl(tiny_encoders_dir):
    return VLAnnotator.load(tiny_encoders_dir, TINY, torch.device("cpu"), torch.float32)


TINY = AnnotateConfig(batch_size=4, max_new_tokens=6, image_area=56 * 56, flush_seconds=0)


def rows(cache_dir) -> dict[str, dict]:
    return {r["key"]: r for r in read_manifest(cache_dir / "manifest").to_pylist()}


def annotated_rows_per_key(cache_dir) -> dict[str, int]:
    """How many rows with an annotation each key has across every part file ever written."""
    counts: dict[str, int] = {}
    for part in sorted((cache_dir / "manifest").glob("part-*.parquet")):
        for r in pq.read_table(part).to_pylist():
            if r["annotation_status"] is not None:
                counts[r["key"]] = counts.get(r["key"], 0) + 1
    return counts


@pytest.mark.slow
def test_tiny_models_annotate_every_accepted_sample_and_a_rerun_does_nothing(produced, cache, tiny_vl, scorer):
    data, _ = produced
    before = rows(cache)
    accepted = set(pending(read_manifest(cache / "manifest"), data, True, True))
    assert len(accepted) == 14
    report = annotate(data, str(cache), TINY, tiny_vl, scorer, progress=False)
    # the random model's answers are not JSON: all counted unparseable, with the raw output kept
    assert report["annotated"] == {"ok": 0, "unparseable": 14, "invalid": 0} and report["alignment_scored"] == 14
    assert report["pending"] == report["done"] == 14 and report["not_found"] == 0 and report["categories"] == {}
    assert json.loads((cache / "annotate_report.json").read_text()) == report
    after = rows(cache)
    for key in accepted:
        row = after[key]
        assert row["annotation_status"] == UNPARSEABLE and row["annotation"] is not None
        assert -1.0 <= row["alignment"] <= 1.0
        assert {c: v for c, v in row.items() if c not in ANNOTATION_COLUMNS} == \
               {c: v for c, v in before[key].items() if c not in ANNOTATION_COLUMNS}
    for key in set(before) - accepted:  # rejected ones are left alone
        assert after[key] == before[key]
    parts = sorted((cache / "manifest").glob("part-*"))
    again = annotate(data, str(cache), TINY, tiny_vl, scorer, progress=False)
    assert again["pending"] == again["done"] == 0 and sorted((cache / "manifest").glob("part-*")) == parts


class Killed(Exception):
    pass


@pytest.mark.slow
def test_a_killed_run_then_a_rerun_annotates_each_sample_once(produced, cache, tiny_vl, tmp_path):
    data, _ = produced
    calls = []

    def dies_in_the_second_batch(images):
        calls.append(len(images))
        if len(calls) == 2:  # what a SIGKILL here would leave on disk
            shutil.copytree(cache / "manifest", tmp_path / "at_kill")
            raise Killed
        return tiny_vl(images)

    with pytest.raises(Killed):
        annotate(data, str(cache), TINY, dies_in_the_second_batch, progress=False)
    shutil.rmtree(cache / "manifest")
    shutil.copytree(tmp_path / "at_kill", cache / "manifest")
    assert len(annotated_rows_per_key(cache)) == 4  # the first batch was published before the kill

    limited = annotate(data, str(cache), dataclasses.replace(TINY, limit=5), tiny_vl, progress=False)
    assert limited["pending"] == 10 and limited["done"] == 5 and limited["left"] == 5 and limited["not_found"] is None
    rest = annotate(data, str(cache), TINY, tiny_vl, progress=False)
    assert rest["pending"] == rest["done"] == 5 and rest["not_found"] == 0
    counts = annotated_rows_per_key(cache)
    assert len(counts) == 14 and set(counts.values()) == {1}
    assert all(r["alignment"] is None for r in rows(cache).values())  # no scorer given: not scored


@pytest.mark.slow
def test_recorded_answers_fill_category_flags_and_text_through_the_manifest(produced, cache):
    data, _ = produced
    answers = iter([dumps(GOOD), "```json\n" + dumps(ZH) + "\n```", dumps({**GOOD, "mosaic": 1}), "oops"] * 4)
    before = rows(cache)
    report = annotate(data, str(cache), AnnotateConfig(batch_size=3), lambda ims: [next(answers) for _ in ims],
                      progress=False)
    assert report["annotated"] == {"ok": 8, "unparseable": 3, "invalid": 3} and report["alignment_scored"] == 0
    assert report["categories"] == {"design": 4, "text_rendering": 4}
    assert "mosaic: 1 is not of type 'boolean'" in report["first_error"]["invalid"]
    after = rows(cache)
    seen_sources = set()
    for key, row in after.items():
        if row["annotation_status"] != OK:
            continue
        answer = json.loads(row["annotation"])
        old = before[key]
        seen_sources.add(old["category_source"])
        if old["category_source"] == "metadata":  # the sample's own metadata outranks the model
            assert (row["category"], row["category_source"]) == ("synthetic", "metadata")
        else:  # a source's category or none: the model's answer replaces it
            assert (row["category"], row["category_source"]) == (answer["category"], "annotation")
        assert row["qr_code"] is True and row["watermark"] is False and row["mosaic"] is False
        assert row["visible_text"] == answer["text"] and row["style"] == "flat graphic design"
        assert row["text_chars"] == max(old["text_chars"] or 0, len(answer["text"]))
        assert row["width"] == old["width"] and row["bucket_h"] == old["bucket_h"] and row["alignment"] is None
    assert {"metadata", "source"} <= seen_sources  # both sides of the trust order were exercised

    # samples whose shards are not given are counted, not failed
    again = annotate(DataConfig(shards=[str(Path(data.shards[0]).parent / "web-*.tar")], base_resolution=BASE,
                                source_categories={"web": "people"}),
                     str(cache), AnnotateConfig(), None, scorer=_ConstantScorer(), progress=False)
    assert again["pending"] == 14 and again["done"] == 4 and again["not_found"] == 10


class _ConstantScorer:
    def score(self, images, captions, batch_size):
        return [0.5] * len(images)


@pytest.mark.slow
def test_cli_alignment_only_and_bad_config(produced, cache, tiny_encoders_dir, tmp_path, capsys):
    from mmdit.launch.cli import main

    data, _ = produced
    common = [f"cache.dir={cache}", f"data.shards={data.shards[0]}", f"data.base_resolution={BASE}",
              f"encoders.dir={tiny_encoders_dir}"]
    assert main(["annotate", *common, "annotate.model=none"]) == 0
    report = json.loads((cache / "annotate_report.json").read_text())
    assert report["alignment_scored"] == 14 and report["model"] is None
    assert report["alignment_model"] == str(Path(tiny_encoders_dir) / "alignment")
    assert all(r["annotation_status"] is None for r in rows(cache).values())

    capsys.readouterr()
    for args, names in [
        ([f"cache.dir={tmp_path / 'empty'}", f"data.shards={data.shards[0]}"], "no manifest"),
        ([*common, "annotate.model=/nonexistent"], "annotate.model='/nonexistent'"),
        ([*common, f"annotate.model={Path(tiny_encoders_dir) / 'vae'}"], "annotate.model="),
        ([*common, "annotate.model=none", "annotate.alignment_model="], "nothing to do"),
        ([*common, "annotate.alignment_model=/nonexistent"], "annotate.alignment_model="),
    ]:
        assert main(["annotate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert names in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_a_plain_qwen25vl_directory_answers_like_the_qwen_image_layout(tiny_encoders_dir, tiny_vl, tmp_path):
    root = Path(tiny_encoders_dir)
    plain = tmp_path / "Qwen2.5-VL-tiny-Instruct"
    plain.mkdir()
    for f in [*(root / "text_encoder").iterdir(), *(root / "tokenizer").iterdir(),
              root / "processor" / "preprocessor_config.json"]:
        shutil.copy(f, plain / f.name)
    vl = VLAnnotator.load(str(plain), TINY, torch.device("cpu"), torch.float32)
    images = [shapes(1, 120, 90), shapes(2, 64, 200)]
    assert vl(images) == tiny_vl(images)


@pytest.mark.slow
def test_a_new_stage_keeps_the_annotations(produced, cache, tiny_encoders_dir):
    """`mmdit produce` at another stage describes every sample again: what annotate found stays."""
    from mmdit.config.produce import CacheConfig, EncodersConfig
    from mmdit.producer.encoders import Encoders
    from mmdit.producer.produce import produce

    data, _ = produced
    answers = iter([dumps(GOOD), dumps(ZH)] * 10)
    annotate(data, str(cache), AnnotateConfig(batch_size=4), lambda ims: [next(answers) for _ in ims],
             scorer=_ConstantScorer(), progress=False)
    annotated = {k: r for k, r in rows(cache).items() if r["annotation_status"] is not None}
    assert len(annotated) == 14
    produce(dataclasses.replace(data, base_resolution=2 * BASE), CacheConfig(dir=str(cache)),
            Encoders.load(EncodersConfig(dir=tiny_encoders_dir)), progress=False)
    after = rows(cache)
    assert {r["base_resolution"] for r in after.values() if r["status"] == OK} == {2 * BASE}  # written again
    for key, old in annotated.items():
        new = after[key]
        assert {c: new[c] for c in ANNOTATION_COLUMNS} == {c: old[c] for c in ANNOTATION_COLUMNS}, key
        assert (new["category"], new["category_source"], new["text_chars"]) == \
               (old["category"], old["category_source"], old["text_chars"]), key
