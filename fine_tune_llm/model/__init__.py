"""The model: tokenizer and (4-bit) model loading, LoRA, the machine it runs on, generation, the tiny model."""

from ..console import quiet_libraries

quiet_libraries()  # before any model library is imported: their import-time warnings are filtered at the source
