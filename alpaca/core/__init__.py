"""Plumbing every script shares: the fire entry point with `--config` files (`cli`), settings tables
(`settings`), JSON record files and atomic writes (`files`), output folders written through a staging
copy (`staging`), one run per output folder or file (`locks`), rank-0 logging (`log`), the torch
thread count (`threads`) and the prompt templates (`prompter`, reading the JSON files in
`alpaca/templates/`). Nothing here imports torch at import time.
"""
