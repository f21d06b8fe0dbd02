"""Building a training dataset from photos: crops, buckets, perceptual-hash dedupe, face crop, preview grid."""
