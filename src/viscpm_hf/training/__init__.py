"""What the training scripts of `examples/` build on: crash-safe checkpoints (`checkpoints`), FSDP units and the
unsharded-run warning (`sharding`), Paint's data and text-state cache (`paint`), and the collator and trainer of the
released VisCPM-Chat, whose CPM-Bee prompts TRL's defaults cannot train (`cpmbee`)."""
