"""Text-rendering evaluation (consumer/text_eval/, `mmdit eval`): the scoring rules, the prompt
sets, the metric's calibration with the real OCR engine on the synthetic renderer's own images,
and the command on a tiny checkpoint."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmdit.consumer.text_eval import (
    BUILTIN,
    KINDS,
    LANGUAGES,
    PromptSetError,
    TextPrompt,
    load_prompts,
    score_images,
    score_reading,
    subset,
    summarize,
    tokens,
)

# ----------------------------------------------------------------------------- scoring


def test_word_accuracy_forgives_lost_spaces_and_split_lines_not_wrong_words():
    target = ["The quick brown fox jumps over the lazy dog."]
    assert score_reading(target, ["The quickbrown foxjumps overthe lazy dog."])["word_accuracy"] == 1.0
    assert score_reading(target, ["The quick bro", "wn fox jumps", "over the lazy dog"])["word_accuracy"] == 1.0
    wrong = score_reading(target, ["The quick brawn fox jumps over the lazy dog"])
    assert (wrong["words_matched"], wrong["words_total"]) == (8, 9) and wrong["one_minus_ned"] < 1.0
    assert score_reading(target, [])["word_accuracy"] == 0.0 and score_reading(target, [])["one_minus_ned"] == 0.0


def test_words_match_in_order_and_the_count_is_the_best_ordering_not_the_first_match():
    # a greedy first match would take the trailing "the" and then find nothing after it: 1 of 4
    assert score_reading(["the quick brown fox"], ["quick brown fox", "the"])["words_matched"] == 3
    assert score_reading(["one two"], ["two one"])["words_matched"] == 1  # out of order: one of them
    # each region is matched on its own: regions read in another order still count
    assert score_reading(["Summer Jazz Night", "August 14"], ["August 14", "Summer Jazz Night"])["word_accuracy"] == 1.0


def test_chinese_is_scored_per_character_and_text_is_normalized():
    assert tokens("Ｈｅｌｌｏ，世界! Revenue up 12%") == ["hello", "世", "界", "revenue", "up", "12"]
    got = score_reading(["欢迎光临"], ["欢迎光"])
    assert (got["words_matched"], got["words_total"]) == (3, 4) and got["one_minus_ned"] == pytest.approx(0.75)
    assert score_reading(["本店，暂停营业。"], ["本店暂停营业"])["one_minus_ned"] == 1.0  # punctuation is no text


def test_summaries_weigh_every_prompt_alike_per_language_and_kind():
    rows = [{"language": "en", "kind": "paragraph", "word_accuracy": 1.0, "one_minus_ned": 0.5, "alignment": None},
            {"language": "zh", "kind": "single_line", "word_accuracy": 0.0, "one_minus_ned": 0.0, "alignment": None}]
    s = summarize(rows)
    assert (s["prompts"], s["word_accuracy"], s["one_minus_ned"], s["alignment"]) == (2, 0.5, 0.25, None)
    assert s["by_language"]["en"]["word_accuracy"] == 1.0 and s["by_kind"]["single_line"]["word_accuracy"] == 0.0


# ----------------------------------------------------------------------------- prompt sets


def test_the_builtin_set_holds_100_valid_prompts_of_both_languages_and_every_kind():
    prompts = load_prompts()
    assert len(prompts) == 100 and len({p.id for p in prompts}) == 100
    assert {(p.language, p.kind) for p in prompts} == {(lang, kind) for lang in LANGUAGES for kind in KINDS}
    assert sum(p.language == "zh" for p in prompts) > sum(p.language == "en" for p in prompts)
    for p in prompts:  # the prompt asks for exactly the text it is scored against
        assert all(t in p.prompt for t in p.target_texts), p.id
        assert (len(p.target_texts) > 1) == (p.kind == "multi_region"), p.id
    four = subset(prompts, 4)
    assert len(four) == 4 and {p.language for p in four} == set(LANGUAGES)


@pytest.mark.parametrize("line, why", [
    ("not json", "not JSON"),
    ('{"prompt": "a", "target_texts": ["a"], "language": "fr", "kind": "single_line"}', "language 'fr'"),
    ('{"prompt": "a", "target_texts": [], "language": "en", "kind": "single_line"}', "target_texts"),
    ('{"prompt": "a", "language": "en", "kind": "single_line"}', "missing target_texts"),
])
def test_a_bad_prompt_file_names_the_line(tmp_path, line, why):
    good = json.dumps({"prompt": 'a sign "OPEN"', "target_texts": ["OPEN"], "language": "en", "kind": "single_line"})
    path = tmp_path / "prompts.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(PromptSetError, match=f"{path}:3: .*{why}"):
        load_prompts(path)
    path.write_text(good + "\n")
    assert load_prompts(path) == [TextPrompt("1", 'a sign "OPEN"', ("OPEN",), "en", "single_line")]


# ----------------------------------------------------------------------------- calibration


@pytest.fixture(scope="session")
def engine():
    from mmdit.consumer.text_eval import OcrEngine

    return OcrEngine()


def renderings(kind: str, per_language: int) -> tuple[list[Image.Image], list[TextPrompt]]:
    """The synthetic renderer's own images of known text (`mmdit synth`): `per_language` of each
    language; the targets are every text box the renderer drew."""
    from mmdit.config.produce import SynthConfig
    from mmdit.producer.synth.shards import make_sample

    cfg = SynthConfig(kinds={kind: 1.0}, edit_fraction=0.0, seed=11, max_side=512)
    images, prompts, count = [], [], dict.fromkeys(LANGUAGES, 0)
    for i in range(100):
        sample = make_sample(i, cfg)
        meta = json.loads(sample["json"])
        if count[meta["lang"]] == per_language:
            continue
        count[meta["lang"]] += 1
        data = sample["png"] if "png" in sample else sample["jpg"]
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        prompts.append(TextPrompt(f"{kind}-{i}", "", tuple(box["text"] for box in meta["layout"]), meta["lang"],
                                  "paragraph" if kind == "pure" else "multi_region"))
        if min(count.values()) == per_language:
            break
    return images, prompts


@pytest.mark.slow  # about 10 s of OCR on a loaded 2-core machine
def test_the_renderers_own_images_read_back_and_pure_noise_does_not(engine):
    """Calibration: clean renderings of known text score >= 0.9 (English) and >= 0.8 (Chinese)
    word accuracy with the real engine; noise scores about 0 (measured: 1.0 and 1.0 on 40
    renderings, 0 on noise; see the report)."""
    images, prompts = [], []
    for kind in ("pure", "complex"):
        more_images, more_prompts = renderings(kind, per_language=2)
        images += more_images
        prompts += more_prompts
    got = summarize(score_images(images, prompts, engine))
    print("calibration", json.dumps({k: got[k] for k in ("by_language", "by_kind")}))
    assert got["by_language"]["en"]["prompts"] == got["by_language"]["zh"]["prompts"] == 4
    assert got["by_language"]["en"]["word_accuracy"] >= 0.9
    assert got["by_language"]["zh"]["word_accuracy"] >= 0.8
    noise = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (384, 384, 3), dtype=np.uint8))
             for k in range(2)]
    scored = summarize(score_images(noise, prompts[:2], engine))
    assert scored["word_accuracy"] <= 0.05 and scored["one_minus_ned"] <= 0.1


# ----------------------------------------------------------------------------- mmdit eval


def test_mmdit_eval_writes_the_page_and_a_metrics_record_of_a_runs_checkpoint(tmp_path, tiny_encoders_dir, capsys):
    from tiny_model import save_tiny_checkpoint

    from mmdit.launch.cli import main as cli
    from mmdit.parallel.state import destroy_parallel

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000007"
    save_tiny_checkpoint(step / "model")
    destroy_parallel()
    (run / "config.yaml").write_text(f"encoders:\n  dir: {tiny_encoders_dir}\n")
    (run / "tensorboard").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert cli(["eval", str(step), f"prompts={bad}"]) == 2  # before any model loads
    assert "bad.jsonl:1: missing" in capsys.readouterr().err
    try:
        assert cli(["eval", str(step), "limit=3", "width=64", "height=64", "steps=2"]) == 0
    finally:
        destroy_parallel()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = run / "eval" / "step_00000007"
    results = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in results["images"]] == [p.id for p in subset(load_prompts(BUILTIN), 3)]
    for r in results["images"]:
        assert Image.open(out / r["file"]).size == (64, 64) and r["alignment"] is not None
        assert set(r["reading"]) == {"lines", "scores", "boxes"} and 0.0 <= r["word_accuracy"] <= 1.0
    page = (out / "index.html").read_text()
    assert all(r["file"] in page for r in results["images"]) and "OCR reading" in page
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 7 and record["eval"] == "text_rendering" and record["dir"] == "eval/step_00000007"
    assert record["prompts"] == 3 and set(record["by_language"]) <= set(LANGUAGES)
    assert record["word_accuracy"] == printed["word_accuracy"] == results["summary"]["word_accuracy"]
    assert record["word_accuracy"] <= 0.2  # a random tiny model renders no text
    assert list((run / "tensorboard").glob("events.*text_eval"))


def test_the_trainers_metrics_writer_takes_a_text_rendering_record_beside_the_loss(tmp_path):
    """What an in-training evaluator hands `MetricsWriter.write_eval`: the record, its log line and
    TensorBoard scalars; the run summary still reports the last held-out loss."""
    from mmdit.consumer.metrics import MetricsWriter, eval_line, eval_scalars

    rows = [{"language": "en", "kind": "single_line", "word_accuracy": 0.5, "one_minus_ned": 0.25, "alignment": 0.1},
            {"language": "zh", "kind": "paragraph", "word_accuracy": 0.0, "one_minus_ned": 0.5, "alignment": 0.3}]
    text = {"eval": "text_rendering", **summarize(rows)}
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    writer.write_eval(10, {"eval": True, "eval_loss": 0.8, "eval_samples": 4})
    writer.write_eval(10, text)
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["eval"] for line in lines] == [True, "text_rendering"] and lines[1]["word_accuracy"] == 0.25
    assert writer.summary()["last_eval_loss"] == 0.8
    assert "word accuracy 0.250 (en 0.500, zh 0.000), 1-NED 0.375, alignment 0.200 over 2 prompts" in eval_line(text)
    scalars = eval_scalars(text)
    assert scalars["eval/text/word_accuracy"] == 0.25 and scalars["eval/text/zh/one_minus_ned"] == 0.5
    assert scalars["eval/text/single_line/alignment"] == 0.1 and eval_scalars(lines[0]) == {"eval/loss": 0.8}
    assert list((tmp_path / "tensorboard").glob("events.*"))
