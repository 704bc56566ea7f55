"""Generating with a fine-tune (`generate.py`): decoding settings and stop strings (`decoding`), the
`ResponseGenerator` that every mode goes through (`generation`), loading a base model with its adapters
(`loading`), batch mode over a file of instructions (`batch`) and the Gradio page (`page`, the only
module that imports gradio). The OpenAI-compatible API mode lives in `alpaca.serving`.
"""
