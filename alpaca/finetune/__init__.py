"""Fine-tuning (`finetune.py`): LoRA, QLoRA and full fine-tuning on Alpaca-format records. `settings`
holds the table of every flag, `resolve` turns a command line into a checked `FinetuneConfig`, and
`run.run_finetune` reads as a table of contents over the steps: records and label masks (`data`,
`packing`), the model and its LoRA (`model`), the Trainer (`trainer`, `distributed`), resume points and
output folders (`checkpoints`), and what a run reports and saves (`report`).
"""
