"""What training reads: items and manifest, the one caption reader, images, pixels, latent/caption caches, batch order."""
