"""Shipping a fine-tune's weights: the exports of a merged model to Hugging Face, Meta and GGUF layouts
(`export/`), Stanford's weight diffs with per-tensor integrity hashes (`diffs`, for
`weight_diff.py`), reading and writing a model folder one tensor at a time (`files`), and turning a
`.gguf` base model into a cached Hugging Face folder (`gguf_import`). Importing this package loads
no torch: `weight_diff.py --help` stays fast.
"""
