"""The frozen CLIP: the model with its taps (``model``), the tokenizer, text embeddings of prompts
(``text``) and random CLIPs of the real shapes for tests (``random``)."""
