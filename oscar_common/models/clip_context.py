"""CLIP's context length, named once: every SD 1.x / 2.x text encoder has 77 positions, so a ``tokens``
embedding has 77 rows and a prompt at most 75 tokens between BOS and EOS.

A module of its own with no imports, so that the wire rules and the config checks can name it without
loading torch. Code that holds a tokenizer or a model reads the length from it instead.
"""

CLIP_CONTEXT_LENGTH = 77
CLIP_PROMPT_TOKENS = CLIP_CONTEXT_LENGTH - 2  # less BOS and EOS
