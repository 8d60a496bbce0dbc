"""Text-rendering evaluation: what Qwen-Image is for, measured with a real OCR engine.

    prompts.py               prompt sets (JSONL: prompt, target_texts, language, kind); the built-in
                             text_rendering.jsonl (100 English and Chinese prompts)
    ocr.py                   the OCR engine (RapidOCR: PP-OCR Chinese/English models in its wheel, offline)
    scoring.py               word accuracy and 1 - NED of a reading against the text asked for
    run.py                   generate with a Sampler, read, score, write images + results.json + index.html
    page.py                  the HTML page: each image beside its reading and scores

`mmdit eval RUN_OR_CKPT` (launch/eval.py) runs it on a checkpoint; a trainer can run
`TextRenderingEval.run` every N steps with its own model's `Sampler`.
"""

from mmdit.consumer.text_eval.ocr import OcrEngine, Reading
from mmdit.consumer.text_eval.prompts import BUILTIN, KINDS, LANGUAGES, PromptSetError, TextPrompt, load_prompts, subset
from mmdit.consumer.text_eval.run import EVAL_KIND, TextRenderingEval, eval_dir, read_results, score_images
from mmdit.consumer.text_eval.scoring import compact, score_reading, summarize, tokens

__all__ = [
    "OcrEngine", "Reading", "BUILTIN", "KINDS", "LANGUAGES", "PromptSetError", "TextPrompt", "load_prompts", "subset",
    "EVAL_KIND", "TextRenderingEval", "eval_dir", "read_results", "score_images", "compact", "score_reading",
    "summarize", "tokens",
]
