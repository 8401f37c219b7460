"""The launcher's library: flags and DeepSpeed JSON (config), text and batches (data), the GPT-2
model (model), run metadata (run_meta) and the training loop (loop); ``cli.main`` ties them up."""
