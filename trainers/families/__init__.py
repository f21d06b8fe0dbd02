"""Model families: how a family (SD1.x today) is loaded, tokenized, encoded and keyed in files."""
