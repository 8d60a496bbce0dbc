"""Synthetic text-rendering data (`mmdit synth`): the Qwen-Image report's three kinds.

shards.py   the shards `mmdit synth` writes, and the pure kind (text on plain or gradient
            backgrounds, plus edit triplets)
scenes.py   compositional: text in perspective on a surface in a scene
layouts.py  complex: slides, app and web screens, posters
draw.py, fonts.py, textures.py, words.py    what the kinds draw with
"""
