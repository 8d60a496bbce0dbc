"""Hostile post-training inputs, each refused with an error that names the file and the line or
key, never a hang or a silent loss: GRPO's JSONL prompt sets (consumer/text_eval/prompts.py),
LoRA files for train.lora.init_from (model/lora_io.py), and preference pairs with a missing or
empty caption or two image sizes (producer/ingest.py, producer/produce.py)."""

import json
import os
import threading

import pytest
import torch
from badfiles import encode, shapes

from mmdit.consumer.text_eval.prompts import MAX_LINE_BYTES, PromptSetError, load_prompts

GOOD = {"prompt": 'a sign "OPEN"', "target_texts": ["OPEN"], "language": "en", "kind": "single_line"}


def line(**changes) -> str:
    return json.dumps({**GOOD, **changes}, ensure_ascii=False)


# ----------------------------------------------------------------------------- GRPO prompt sets


def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    done = []
    reader = threading.Thread(target=lambda: done.append(pytest.raises(PromptSetError, load_prompts, fifo)))
    reader.start()
    reader.join(timeout=60)  # no writer ever opens the FIFO: a blocking open would hang here
    assert not reader.is_alive() and "a FIFO" in str(done[0].value) and str(fifo) in str(done[0].value)
    with pytest.raises(PromptSetError, match="a directory"):
        load_prompts(tmp_path)
    with pytest.raises(PromptSetError, match="cannot read it"):
        load_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("lines, where, message", [
    ([], "", "holds no prompt"),
    (["", "  "], "", "holds no prompt"),
    ([line(), "{not json"], ":2", "not JSON"),
    ([line(), "[1, 2]"], ":2", "expected a JSON object"),
    (['{"target_texts": ["A"], "language": "en", "kind": "single_line"}'], ":1", "missing prompt"),
    ([line(prompt=7)], ":1", "prompt must be a non-empty string"),
    ([line(prompt="")], ":1", "prompt must be a non-empty string"),
    ([line(target_texts=[1, "A"])], ":1", "target_texts must be a non-empty list"),
    ([line(target_texts={"A": 1})], ":1", "target_texts must be a non-empty list"),
    ([line(), line(id="x", score=float("nan"))], ":2", "NaN is not a number JSON allows"),
    ([line(id=float("inf"))], ":1", "Infinity is not a number JSON allows"),
    ([json.dumps({**GOOD, "prompt": "\ud800 broken"})], ":1", "not UTF-8 encodable"),
])
def test_a_bad_prompt_set_names_the_file_and_line(tmp_path, lines, where, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(PromptSetError) as e:
        load_prompts(path)
    assert f"{path}{where}" in str(e.value) and message in str(e.value), str(e.value)


def test_bom_crlf_blank_lines_and_a_line_separator_inside_a_prompt_are_read(tmp_path):
    path = tmp_path / "p.jsonl"
    text = "\r\n".join([line(id="a"), "", line(id="b", prompt="two\u2028lines \u201cOK\u201d"), "   ", ""])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = load_prompts(path)
    assert [p.id for p in got] == ["a", "b"] and got[1].prompt == "two\u2028lines \u201cOK\u201d"


def test_a_huge_line_and_invalid_utf8_are_refused_by_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(line() + "\n" + line(prompt="x" * (MAX_LINE_BYTES + 1)) + "\n")
    with pytest.raises(PromptSetError, match=f"{path}:2: the line is over"):
        load_prompts(path)
    path.write_bytes(line().encode() + b"\n" + line().encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(PromptSetError, match=f"{path}:3: not UTF-8"):
        load_prompts(path)


# ----------------------------------------------------------------------------- train.lora.init_from


@pytest.fixture(scope="module")
def lora():
    """A tiny LoRA model at TP=1 and a valid diffusers file of adapters for it."""
    from lora_workers import LORA, lora_model, random_adapters
    from model_workers import random_full_state_dict

    from mmdit.config.loader import load_config

    args = load_config([]).model
    state = random_full_state_dict(args, seed=7)
    adapters = random_adapters(args, state, seed=1)
    return {"model": lora_model(args, state, None), "adapters": adapters, "scale": LORA.alpha / LORA.rank}


def adapter_values(model) -> dict:
    from mmdit.model.lora_io import adapter_tensors

    return {name: t.detach().clone() for name, t, _ in adapter_tensors(model)}


def refused(model, src, match):
    """import_lora raises a ValueError matching `match` and the model's adapters are unchanged."""
    from mmdit.model.checkpoint import import_lora

    before = adapter_values(model)
    with pytest.raises(ValueError, match=match):
        import_lora(model, src, 1.0)
    after = adapter_values(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_lora_that_is_not_a_file_is_refused(lora, tmp_path):
    fifo = tmp_path / "lora.safetensors"
    os.mkfifo(fifo)
    refused(lora["model"], fifo, "a FIFO, not a LoRA file")  # never opened: no writer, no hang
    refused(lora["model"], tmp_path / "none.safetensors", "no such LoRA file")
    with pytest.raises(FileNotFoundError, match="holds neither"):
        refused(lora["model"], tmp_path, "")


def test_a_truncated_or_foreign_lora_file_is_refused(lora, tmp_path):
    from mmdit.model.lora_io import write_diffusers_lora

    good = write_diffusers_lora(lora["adapters"], 1.0, tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    refused(lora["model"], tmp_path / "cut.safetensors", "cut.safetensors: not a readable safetensors file")
    (tmp_path / "zip.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    refused(lora["model"], tmp_path / "zip.safetensors", "not a readable safetensors file")


def test_wrong_shapes_a_lone_b_and_nan_values_are_refused_naming_the_key(lora, tmp_path):
    from safetensors.torch import save_file

    from mmdit.model.lora_io import write_diffusers_lora

    adapters = lora["adapters"]
    a_name = sorted(n for n in adapters if n.endswith("lora_A.weight"))[0]
    rank, width = adapters[a_name].shape
    wrong = {**adapters, a_name: torch.zeros(rank + 2, width)}  # a file of another rank for one module
    wrong[a_name.replace("lora_A", "lora_B")] = torch.zeros(adapters[a_name.replace("lora_A", "lora_B")].shape[0],
                                                            rank + 2)
    src = tmp_path / "rank.safetensors"
    save_file({f"transformer.{n}": t.contiguous() for n, t in wrong.items()}, str(src))
    refused(lora["model"], src, rf"{a_name}: shape \({rank + 2}, {width}\) in the file, but this model's adapter "
                                rf"is \({rank}, {width}\)")
    b_name = a_name.replace("lora_A", "lora_B")
    save_file({f"transformer.{b_name}": adapters[b_name].contiguous()}, str(tmp_path / "lone.safetensors"))
    refused(lora["model"], tmp_path / "lone.safetensors", f"{b_name} has no .*lora_A.weight")
    poisoned = {**adapters, b_name: adapters[b_name].clone()}
    poisoned[b_name][0, 0] = float("nan")
    refused(lora["model"], write_diffusers_lora(poisoned, 1.0, tmp_path / "nan.safetensors"),
            f"{b_name}: NaN or infinite")


def test_a_valid_lora_file_still_loads(lora, tmp_path):
    from mmdit.model.checkpoint import import_lora
    from mmdit.model.lora_io import write_diffusers_lora

    src = write_diffusers_lora(lora["adapters"], 1.0, tmp_path / "good.safetensors")
    assert import_lora(lora["model"], src, 1.0) == []
    got = adapter_values(lora["model"])
    assert all(torch.allclose(got[n], t, atol=1e-6, rtol=0) for n, t in lora["adapters"].items())


# ----------------------------------------------------------------------------- preference pairs


def raw_pair(members: dict) -> dict:
    return {"__key__": "p0", "__url__": "/data/pairs-000000.tar", **members}


@pytest.mark.parametrize("caption, reason", [(None, "caption_missing"), (b"  \n", "caption_empty")])
def test_a_pair_without_a_caption_is_refused_naming_the_sample(caption, reason):
    from mmdit.producer.ingest import SampleError, decode_sample

    members = {"win.png": encode(shapes(1, 64, 64)), "lose.png": encode(shapes(2, 64, 64))}
    if caption is not None:
        members["txt"] = caption
    with pytest.raises(SampleError) as e:
        decode_sample(raw_pair(members))
    assert e.value.reason == reason and "pairs-000000/p0" in str(e.value)


def test_a_pair_of_two_sizes_gets_the_rejected_image_resized_to_the_preferred_ones_bucket():
    from mmdit.cache import bucket_set
    from mmdit.config.data import DataConfig, FilterConfig
    from mmdit.producer.encoders import preprocess_image
    from mmdit.producer.produce import Context, prepare

    data = DataConfig(base_resolution=64, filters=FilterConfig(min_side=0, drop_duplicates=False))
    win, lose = shapes(3, 96, 64), shapes(4, 300, 200)  # same aspect, three times the size
    item = prepare(raw_pair({"win.png": encode(win), "lose.png": encode(lose), "txt": b"ellipses"}),
                   Context(data, bucket_set(64), preprocess_image))
    assert not item.reason and item.pixels.shape == item.src_pixels.shape
    h, w = item.pixels.shape[1:]
    assert (item.row["src_bucket_h"], item.row["src_bucket_w"]) == (item.row["bucket_h"], item.row["bucket_w"]) == (h, w)
    assert torch.equal(item.src_pixels, preprocess_image(lose, (h, w)))
