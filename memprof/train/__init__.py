"""The launcher's library: flags and DeepSpeed JSON (config), text and batches (data), the GPT-2
model (model), run metadata (launched_run) and the training loop (loop); ``cli.main`` ties them up."""
