"""Annotation (`mmdit annotate`): a VL model's JSON answer and an image-caption alignment score
per accepted sample, into the manifest.

run.py        the pass over the manifest (batched, resumable) and its report
answers.py    the prompt, the answer's JSON Schema and its parsing
alignment.py  the CLIP/SigLIP alignment scorer
"""
