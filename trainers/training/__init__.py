"""The one training loop (orchestration), its objective, batches, optimizer, resume, validation and plots."""
