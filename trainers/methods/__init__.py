"""Training methods: what is trained and what is saved; a new method is one module plus one registry line."""
